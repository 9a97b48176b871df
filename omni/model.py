"""OmniDecoder: the early-fusion decoder-only transformer, in plain PyTorch.

Chameleon Team, "Chameleon: Mixed-Modal Early-Fusion Foundation Models", 2024
(https://arxiv.org/abs/2405.09818): one transformer over one vocabulary of text, image and audio
tokens, with the changes that keep mixed-modal training stable: QK-norm, optional norm
re-ordering ("swin norm", Liu et al. 2022, https://arxiv.org/abs/2111.09883) and z-loss. The rest
is LLaMA's (Touvron et al. 2023): pre-norm RMSNorm (Zhang & Sennrich 2019), SwiGLU (Shazeer 2020),
RoPE (Su et al. 2021; its long-context variants, ``model.rope``, in omni.rope),
grouped-query attention (Ainslie et al. 2023), no biases.

Weight names are plain and are the contract with the converters (Chameleon's today; the
megatron-core backend's, planned in parallel/)
(shapes with D=dim, H=n_heads, K=n_kv_heads, d=head_dim, F=ffn_dim, V=vocab_size)::

    tok_embeddings.weight                  [V, D]
    layers.{i}.attention_norm.weight       [D]      RMSNorm before attention (after it with swin_norm)
    layers.{i}.attention.wq.weight         [H*d, D]
    layers.{i}.attention.wk.weight         [K*d, D]
    layers.{i}.attention.wv.weight         [K*d, D]
    layers.{i}.attention.wo.weight         [D, H*d]
    layers.{i}.attention.q_norm.weight     [H, d] per_head | [d] shared  (+ .bias for layernorm)
    layers.{i}.attention.k_norm.weight     [K, d] per_head | [d] shared  (+ .bias for layernorm)
    layers.{i}.ffn_norm.weight             [D]      RMSNorm before the MLP (after it with swin_norm)
    layers.{i}.feed_forward.w1.weight      [F, D]   gate
    layers.{i}.feed_forward.w3.weight      [F, D]   up
    layers.{i}.feed_forward.w2.weight      [D, F]   down
    norm.weight                            [D]      final RMSNorm
    output.weight                          [V, D]   absent when tie_embeddings

RoPE rotates the two halves of each head (``rotate_half``, as Hugging Face's Chameleon/LLaMA and
megatron-core's default), so Hugging Face weights are used as they are. Megatron-core's
``qk_layernorm`` is the ``shared`` QK-norm; megatron's ``linear_qkv`` and ``linear_fc1`` are
concatenations of wq/wk/wv and w1/w3 (what the planned converter in parallel/ will do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omni import rope as rope_lib
from omni.config.model import MROPE_KINDS, ModelConfig, RopeConfig
from omni.errors import OmniError

MODALITIES = ("text", "special", "image", "audio")
"""Per-modality loss names, indexed like omni.vocab's TEXT, SPECIAL, IMAGE, AUDIO."""
IGNORE_INDEX = -100
"""A label equal to this is never scored (as in torch's cross_entropy)."""


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight


class QKNorm(nn.Module):
    """Normalization of each query/key head over head_dim.

    ``per_head``: a weight (and bias) per head, [n, d], as Chameleon (statistics are still over d
    only). ``shared``: one weight [d] for all heads, as megatron-core's ``qk_layernorm``.
    """

    def __init__(self, n_heads: int, head_dim: int, mode: str, kind: str, eps: float):
        super().__init__()
        shape = (n_heads, head_dim) if mode == "per_head" else (head_dim,)
        self.kind, self.eps, self.head_dim = kind, eps, head_dim
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, n, d]
        d = (self.head_dim,)
        if self.kind == "layernorm":
            y = F.layer_norm(x.float(), d, eps=self.eps).to(x.dtype)
            return y * self.weight + self.bias
        return F.rms_norm(x.float(), d, eps=self.eps).to(x.dtype) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 rope: RopeConfig | None = None):
    """positions [B, T] (or [3, B, T] for the M-RoPE kinds) -> (cos, sin), each [B, 1, T, d]
    (broadcast over heads), of the position encoding ``rope`` (None: plain RoPE; omni.rope)."""
    inv_freq, scaling = rope_lib.frequencies(rope, head_dim, theta, positions.device)
    return rope_lib.cos_sin(positions, inv_freq, dtype, scaling, rope_lib.mrope_section(rope, head_dim))


def rope_table(max_len: int, head_dim: int, theta: float,
               rope: RopeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of positions 0..max_len-1, each [max_len, d] fp32: rope_cos_sin's values, computed once.

    Indexing this table (as torchtitan's precomputed ``freqs_cis``) rather than evaluating cos/sin
    per call matters under torch.compile on CPU: inductor fuses ``rope_cos_sin`` into every
    consumer and re-evaluates pow/cos/sin per element of q and k. For the M-RoPE kinds it holds
    the 1-D positions (p, p, p): what every token gets without explicit 3-D positions.
    """
    cos, sin = rope_cos_sin(torch.arange(max_len)[None], head_dim, theta, torch.float32, rope)  # [1, 1, L, d]
    return cos[0, 0], sin[0, 0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, T, d] rotated by position: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] (equal ids = same document, documents contiguous) -> positions [B, T] restarting at 0 per document."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values  # index of each doc's first token
    return idx - first


def _dense(x: torch.Tensor) -> torch.Tensor:
    """A copy with contiguous strides (``.contiguous()`` keeps the strides of size-1 dims)."""
    return x.clone(memory_format=torch.contiguous_format)


class KVCache:
    """Keys and values of every layer for incremental decoding, in buffers written in place.

    ``model(prompt, cache=cache)`` fills it (prefill); later calls feed one or more new tokens and
    attend to everything cached. Positions continue where the cache ends (restarting at document
    boundaries when ``doc_ids`` are given).

    Each layer's keys and values live in a buffer [B, K, capacity, d]; a step writes its T new
    positions in place and attends to a view of the first ``length`` + T. Appending by
    concatenation would copy the whole cache every step, O(context) bytes per token: at 4k
    positions as many bytes as a 20M model's weights. ``capacity`` (e.g. prompt + new tokens, as
    generation passes it) sizes the buffers at the first write; past it they double.
    """

    def __init__(self, n_layers: int, capacity: int = 0):
        self.k: list[torch.Tensor | None] = [None] * n_layers  # each [B, K, capacity, d]
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.doc_ids: torch.Tensor | None = None  # [B, length], or None when all tokens are one document
        self.length = 0  # positions filled; the model advances it after each forward
        self.capacity = capacity

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (drop tokens fed speculatively and not kept)."""
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length
        if self.doc_ids is not None:  # dense strides: a compiled step guards on them
            self.doc_ids = _dense(self.doc_ids[:, :length])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, d] after the first ``length`` positions; return all keys and values
        [B, K, length+T, d] (views of the buffers)."""
        L, T = self.length, k.shape[2]
        buf = self.k[layer]
        if buf is None or buf.shape[2] < L + T:  # (re)allocate: at least double, at least capacity
            B, K, _, d = k.shape
            cap = max(L + T, self.capacity, 2 * buf.shape[2] if buf is not None else 0)
            new_k, new_v = k.new_empty(B, K, cap, d), v.new_empty(B, K, cap, d)
            if buf is not None:
                new_k[:, :, :L], new_v[:, :, :L] = buf[:, :, :L], self.v[layer][:, :, :L]
            self.k[layer], self.v[layer] = new_k, new_v
        self.k[layer][:, :, L:L + T] = k
        self.v[layer][:, :, L:L + T] = v
        return self.k[layer][:, :, :L + T], self.v[layer][:, :, :L + T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm != "none":
            self.q_norm = QKNorm(cfg.n_heads, cfg.head_dim, cfg.qk_norm, cfg.qk_norm_type, cfg.qk_norm_eps)
            self.k_norm = QKNorm(cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, cfg.qk_norm_type, cfg.qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, layer: int, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, d]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, d]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # QK-norm before RoPE, as Chameleon
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, n, T, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, K, L+T, d]
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,  # None: plain causal; else bool [B, 1, T, L+T], True = may attend
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # [B, H, T, d]
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):  # [B, T, D] -> [B, T, D]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.swin_norm = layer, cfg.swin_norm
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, cache):
        if self.swin_norm:  # Chameleon-34B: normalize each branch's output, not its input
            h = x + self.drop(self.attention_norm(self.attention(x, cos, sin, mask, self.layer, cache)))
            return h + self.drop(self.ffn_norm(self.feed_forward(h)))
        h = x + self.drop(self.attention(self.attention_norm(x), cos, sin, mask, self.layer, cache))
        return h + self.drop(self.feed_forward(self.ffn_norm(h)))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class CrossEntropyLSE(torch.autograd.Function):
    """Per-token cross-entropy and logsumexp from one softmax: logits [N, V], target [N] -> (ce [N], lse [N]).

    Written out because the z-loss needs logsumexp next to the cross-entropy: autograd of
    ``logsumexp`` plus ``gather`` would materialize three [N, V] tensors in backward, this makes one
    (softmax * (g_ce + g_lse), minus g_ce at the target). Computed in fp32.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor):
        x = _at_least_fp32(logits)
        lse = torch.logsumexp(x, dim=-1)  # [N]
        ce = lse - x.gather(1, target[:, None]).squeeze(1)
        ctx.save_for_backward(logits, lse, target)
        return ce, lse

    @staticmethod
    def backward(ctx, g_ce: torch.Tensor, g_lse: torch.Tensor):
        logits, lse, target = ctx.saved_tensors
        g = (g_ce + g_lse)[:, None]  # d/dx of both terms share softmax(x)
        if torch.compiler.is_compiling():
            # one pointwise kernel for inductor: softmax * g - g_ce * onehot(target) (a scatter would
            # first zero-fill an [N, V] buffer: 20 ms of a 1.9 s step of bench/decoder.py)
            x = _at_least_fp32(logits)
            onehot = torch.arange(x.shape[1], device=x.device)[None] == target[:, None]  # [N, V]
            grad = (x - lse[:, None]).exp() * g - torch.where(onehot, g_ce[:, None], 0.0)
        else:
            grad = torch.sub(_at_least_fp32(logits), lse[:, None]).exp_().mul_(g)  # softmax * g, one [N, V] buffer
            grad.scatter_add_(1, target[:, None], -g_ce[:, None])
        return grad.to(logits.dtype), None


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------
@dataclass
class DecoderOutput:
    """What :meth:`OmniDecoder.forward` returns."""

    logits: torch.Tensor
    """[B, T, V] next-token logits; detached when ``labels`` were given (``loss`` is then the
    differentiable output: a compiled graph would otherwise zero-fill a [B, T, V] gradient for them
    every backward). Call without labels for logits to differentiate through."""
    loss: torch.Tensor | None = None
    """Scalar: ce_loss + z_loss coefficient * z_loss (given labels)."""
    ce_loss: torch.Tensor | None = None
    """Scalar: mean cross-entropy over scored tokens."""
    z_loss: torch.Tensor | None = None
    """Scalar: mean logsumexp(logits)^2 over scored tokens (before the coefficient)."""
    loss_by_modality: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached mean cross-entropy per modality of the target token (text/special/image/audio) present."""
    tokens_by_modality: dict[str, int] = field(default_factory=dict)
    """Number of scored target tokens per modality."""
    hidden: torch.Tensor | None = None
    """[B, T, D] final hidden states (after the final norm), with ``return_hidden=True``."""
    cache: KVCache | None = None
    """The KV cache passed in, now holding this call's tokens too."""


class OmniDecoder(nn.Module):
    """Decoder-only transformer over the unified vocabulary. See the module docstring for weights."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        # Modality of every id (omni.vocab.UnifiedVocab.modality_table), for the per-modality loss.
        self.register_buffer("modality_table", None, persistent=False)
        # RoPE cos/sin of positions [0, max_seq_len), each [max_seq_len, head_dim] (not saved: derived).
        self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and linears; wo and w2 scaled by 1/sqrt(2*n_layers) (GPT-2).

        Also recomputes the derived buffers (:meth:`init_buffers`).
        """
        if self.rope_cos.device.type != "meta":
            self.init_buffers()
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2 and "norm" not in name:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def init_buffers(self) -> None:
        """(Re)compute the RoPE table on the parameters' device: call after building on the meta
        device and loading weights with ``assign=True`` (omni.load does), or after ``to_empty``."""
        c = self.config
        device = self.tok_embeddings.weight.device
        with torch.device(device):
            cos, sin = rope_table(c.max_seq_len, c.head_dim, c.rope_theta, c.rope)
        self.rope_cos, self.rope_sin = cos, sin  # replaces the registered (non-persistent) buffers

    def set_modality_table(self, table: torch.Tensor | None) -> None:
        """Use ``table`` [V] (UnifiedVocab.modality_table) to split the loss by modality."""
        if table is not None and table.numel() != self.config.vocab_size:
            raise OmniError(f"modality table has {table.numel()} ids, the model's vocab has {self.config.vocab_size}")
        device = self.tok_embeddings.weight.device
        self.modality_table = None if table is None else table.to(device=device, dtype=torch.long)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Parameters (tied weights counted once); ``exclude_embedding`` leaves out tok_embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty :class:`KVCache`; ``capacity`` positions are allocated at its first write."""
        return KVCache(self.config.n_layers, capacity)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        splice=None,
    ) -> DecoderOutput:
        """Logits for ``ids`` [B, T]; with ``labels`` also the loss.

        labels: [B, T] target of each position, already shifted (labels[:, t] = ids[:, t+1]), as the
            packed datasets store them; IGNORE_INDEX (-100) is never scored.
        loss_mask: [B, T] 1/0 (or weights) per target; a position with 0 is not scored.
        doc_ids: [B, T] document of each token in a packed row; attention is block-diagonal causal
            (no token sees another document) and positions restart at 0 per document.
        position_ids: [B, T] explicit RoPE positions (overrides the ones derived above); with
            ``model.rope.kind`` 'mrope'/'mrope_plus' also [3, B, T] (time, height, width:
            :func:`omni.rope.mrope_positions`). Without them every token is at (p, p, p).
        modality: [B, T] modality of each target (omni.vocab TEXT/SPECIAL/IMAGE/AUDIO); by default
            looked up in the modality table set by :meth:`set_modality_table`.
        cache: a :class:`KVCache`; the new tokens attend to everything in it and are appended.
        splice: a function of the input embeddings [B, T, D] -> [B, T, D], applied before the first
            block (the routing heads' super-link queries replace the rows of their slots,
            :mod:`omni.decoders.routing`). Called inside this forward, so a wrapper's hooks (FSDP's
            unsharding of the embedding) have run.
        """
        if ids.dim() != 2:
            raise OmniError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        explicit_positions = position_ids is not None
        if explicit_positions and position_ids.dim() == 3:
            if self.config.rope.kind not in MROPE_KINDS:
                raise OmniError(f"position_ids of shape {tuple(position_ids.shape)} are M-RoPE's [3, B, T]: they "
                                f"need model.rope.kind 'mrope' or 'mrope_plus' (this model's is "
                                f"{self.config.rope.kind!r}); pass [B, T]")
            if position_ids.shape[0] != 3 or position_ids.shape[2] != T or position_ids.shape[1] not in (1, B):
                raise OmniError(f"3-D position_ids must be [3, B, T] = [3, {B}, {T}], got {tuple(position_ids.shape)}")
        mask, positions = self._mask_and_positions(B, T, past, ids.device, doc_ids, position_ids, cache)

        h = self.tok_embeddings(ids)  # [B, T, D]
        if splice is not None:
            h = splice(h)
        if not explicit_positions and past + T <= self.rope_cos.shape[0] and not self.rope_cos.is_meta:
            # derived positions are < past + T: look them up in the table (meta: built on the meta
            # device and init_buffers not called yet)
            cos, sin = self.rope_cos[positions].to(h.dtype)[:, None], self.rope_sin[positions].to(h.dtype)[:, None]
        else:  # explicit positions (any value) or beyond max_seq_len: evaluate
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype, self.config.rope)
        for block in self.layers:
            h = block(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length = past + T  # every layer wrote positions past .. past+T-1
        h = self.norm(h)
        logits = F.linear(h, self.head_weight)  # [B, T, V]

        out = DecoderOutput(logits=logits, hidden=h if return_hidden else None, cache=cache)
        if labels is not None:
            self._loss(out, labels, loss_mask, modality)
            out.logits = logits.detach()
        return out

    # ------------------------------------------------------------------------------------------
    def _mask_and_positions(self, B, T, past, device, doc_ids, position_ids, cache):
        """(attention mask or None for plain causal, positions [B or 1, T])."""
        if doc_ids is None and cache is not None and cache.doc_ids is not None:
            raise OmniError("the cache was filled with doc_ids: pass doc_ids for the new tokens too")
        if doc_ids is not None and doc_ids.shape != (B, T):
            raise OmniError(f"doc_ids must have the shape of ids {(B, T)}, got {tuple(doc_ids.shape)}")
        all_docs = doc_ids
        if cache is not None and doc_ids is not None:
            prev = cache.doc_ids
            if prev is None:  # a cache filled without doc_ids: its tokens belong to the first new document
                prev = doc_ids[:, :1].expand(B, past)
            all_docs = torch.cat([prev, doc_ids], dim=1)  # [B, L+T]
            cache.doc_ids = all_docs
        if position_ids is None:
            if all_docs is not None:
                position_ids = positions_from_doc_ids(all_docs)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None]  # [1, T]

        if all_docs is None and past == 0:
            return None, position_ids  # plain causal: SDPA's is_causal path
        if past == 0 and not torch.compiler.is_compiling() and bool((all_docs == all_docs[:, :1]).all()):
            # every row is one document without padding (one prompt's prefill, an unpacked batch):
            # also plain causal. With a mask SDPA's CPU kernel computes all T x T scores and
            # converts the mask per layer (a 3000-token prompt: 3.1 s instead of 1.8 s). Not
            # under torch.compile: the check reads the data
            return None, position_ids
        # Explicit bool mask [B, 1, T, L+T]: causal (key index <= query index, offset by the cache)
        q_idx = torch.arange(past, past + T, device=device)[:, None]
        k_idx = torch.arange(past + T, device=device)[None, :]
        mask = (k_idx <= q_idx)[None, None].expand(B, 1, T, past + T)
        if all_docs is not None:  # ... and the same document
            same = all_docs[:, past:, None] == all_docs[:, None, :]  # [B, T, L+T]
            mask = mask & same[:, None]
        return mask, position_ids

    def _loss(self, out: DecoderOutput, labels, loss_mask, modality) -> None:
        valid = labels != IGNORE_INDEX
        weight = valid.float() if loss_mask is None else loss_mask.float() * valid
        target = labels.masked_fill(~valid, 0)
        V = out.logits.shape[-1]
        ce, lse = CrossEntropyLSE.apply(out.logits.reshape(-1, V), target.reshape(-1))  # [B*T] each
        ce, lse = ce.view_as(weight), lse.view_as(weight)
        denom = weight.sum().clamp_min(1.0)
        out.ce_loss = (ce * weight).sum() / denom
        out.z_loss = (lse.square() * weight).sum() / denom  # PaLM's z-loss: pushes log Z towards 0
        out.loss = out.ce_loss + self.config.z_loss * out.z_loss if self.config.z_loss else out.ce_loss

        if modality is None and self.modality_table is not None:
            modality = self.modality_table[target]
        if modality is None:
            return
        with torch.no_grad():  # per-modality breakdown, for logging
            mod = modality.long().clamp(0, 4).reshape(-1)
            sums = torch.zeros(5, device=ce.device).index_add_(0, mod, (ce * weight).reshape(-1))
            counts = torch.zeros(5, device=ce.device).index_add_(0, mod, (weight > 0).float().reshape(-1))
            for i, name in enumerate(MODALITIES):
                n = int(counts[i])
                if n:
                    out.loss_by_modality[name] = sums[i] / counts[i]
                    out.tokens_by_modality[name] = n


def flops_per_token(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: 6*N_matmul + attention.

    N_matmul counts the weights every token multiplies by: the blocks' linears and the output
    head (not the embedding lookup, not norms). Forward + backward cost 2 + 4 FLOPs per weight
    (Kaplan et al. 2020). Attention scores and the weighted sum of values cost 2 * 2 * seq_len * D
    forward per token and layer, x3 with backward: 12 * n_layers * D * seq_len (PaLM, Chowdhery
    et al. 2022, appendix B); with ``causal`` only the lower triangle is needed, so half of that.
    """
    c = config
    d = c.head_dim
    per_layer = c.dim * (c.n_heads * d) * 2 + c.dim * (c.n_kv_heads * d) * 2 + 3 * c.dim * c.ffn_dim
    n_matmul = c.n_layers * per_layer + c.vocab_size * c.dim
    attn = 12 * c.n_layers * c.dim * seq_len
    return 6.0 * n_matmul + (attn / 2 if causal else attn)


def count_parameters(config: ModelConfig) -> int:
    """Parameters of OmniDecoder(config) without building it."""
    c = config
    d = c.head_dim
    qk = 0
    if c.qk_norm != "none":
        per = (c.n_heads + c.n_kv_heads) * d if c.qk_norm == "per_head" else 2 * d
        qk = per * (2 if c.qk_norm_type == "layernorm" else 1)
    per_layer = (c.dim * c.n_heads * d * 2 + c.dim * c.n_kv_heads * d * 2 + 3 * c.dim * c.ffn_dim
                 + 2 * c.dim + qk)
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + c.n_layers * per_layer + c.dim + head
