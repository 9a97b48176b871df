"""Weight layout conversion OmniDecoder <-> megatron-core GPTModel (local or TE spec); pure tensors.

Imports nothing of megatron-core: these are index manipulations, testable anywhere. The omni names
are omni.model's (its module docstring); the megatron names are those of ``GPTModel.state_dict()``
in megatron-core 0.16.1 with the layer spec of parallel/megatron/model.py (``_extra_state`` entries
of the linear layers are left out: load with ``strict=False``, see ``model.load_omni_state``).

Shapes (D=dim, H=n_heads, K=n_kv_heads, d=head_dim, F=ffn_dim, V=vocab_size, Vp=padded vocab,
TP ranks; Hl=H/TP, Kl=K/TP heads of one rank)::

    omni                                    megatron (one TP rank)
    tok_embeddings.weight      [V, D]       embedding.word_embeddings.weight       [Vp/TP, D]  rows
    layers.i.attention_norm    [D]          decoder.layers.j.input_layernorm.weight [D]        replicated
    wq [H*d, D], wk, wv [K*d, D]            ...self_attention.linear_qkv.weight [(Hl+2Kl)*d, D] per group
    q_norm [H, d] | [d] (+bias)             ...self_attention.q_layernorm.weight [Hl, d] | [d]
    k_norm [K, d] | [d] (+bias)             ...self_attention.k_layernorm.weight [Kl, d] | [d]
    wo [D, H*d]                             ...self_attention.linear_proj.weight   [D, Hl*d]   columns
    ffn_norm [D]                            ...pre_mlp_layernorm.weight            [D]         replicated
    w1 (gate), w3 (up) [F, D]               ...mlp.linear_fc1.weight          [2F/TP, D]  [gate_r; up_r]
    w2 [D, F]                               ...mlp.linear_fc2.weight          [D, F/TP]   columns
    norm.weight [D]                         decoder.final_layernorm.weight         [D]         replicated
    output.weight [V, D]                    output_layer.weight                    [Vp/TP, D]  rows

Fused QKV: megatron splits it per query group g (K groups of H/K query heads sharing one k and one
v head): rows [q heads of g | k_g | v_g] for g = 0..K-1, and a TP rank holds whole groups
(K/TP consecutive groups, hence the consecutive q heads r*Hl..(r+1)*Hl-1, which is why wo splits
on contiguous columns). fc1: each rank's rows are its slice of the gate followed by its slice of
the up projection (not a contiguous chunk of [w1; w3]); megatron's SwiGLU takes chunk(2) of the
rank's output.

Pipeline: the model is split into pp * vp chunks of L / (pp * vp) consecutive layers; chunk
(pp_rank, vp_stage) is number vp_stage * pp + pp_rank (megatron's interleaved order) and numbers
its layers from 0. The embedding lives on chunk 0 (pp_rank 0, vp_stage 0), the final norm and the
output layer on the last chunk (pp_rank pp-1, vp_stage vp-1).

Vocabulary: megatron-core's GPTModel does not pad (Megatron-LM's training script does): the model is
built with :func:`padded_vocab_size`, a multiple of 128 x 8 = 1024 rows (Megatron-LM's
``make_vocab_size_divisible_by`` of 128 per TP rank, as if TP were 8, a node), so the rows split
evenly at every TP of 1, 2, 4 or 8 AND the padded size is the same at each: a dist_checkpointing
checkpoint saved at one TP loads at another (its embedding has one global shape). The padded rows
are zeros, and the loss and omni's logits use only the first V columns (parallel/megatron/loss.py
masks the rest). Another TP (one that does not divide 1024) pads to a multiple of 128 x TP as well.

Tied embeddings (tie_embeddings): with one stage the output layer has no weight (absent here);
with PP > 1 the last stage keeps a copy (``output_layer.weight``) that megatron keeps equal to the
embedding: :func:`to_megatron` writes it, :func:`from_megatron` checks it (weights) or adds it
(gradients, ``tied='sum'``: the tied weight's gradient is the sum of both copies').
"""

from __future__ import annotations

import torch

MEGATRON_VOCAB_DIVISOR = 128
"""Megatron-LM's default ``make_vocab_size_divisible_by``: rows per TP rank are a multiple of this."""
RESHARD_TP = 8
"""The padded vocab is laid out as if TP were this (a node): the same size at TP 1, 2, 4 and 8."""


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = MEGATRON_VOCAB_DIVISOR) -> int:
    """The vocab megatron's embedding and output layer are built with: ``vocab_size`` rounded up to a
    multiple of lcm(divisible_by x RESHARD_TP, divisible_by x tp): the same for every TP dividing 8
    (checkpoints reshard across them), and every TP rank holds as many rows."""
    import math

    multiple = math.lcm(divisible_by * RESHARD_TP, divisible_by * tp)
    return -(-vocab_size // multiple) * multiple


def chunk_layers(n_layers: int, pp: int, vp: int, pp_rank: int, vp_stage: int) -> range:
    """Global indices of the layers of model chunk (pp_rank, vp_stage)."""
    if n_layers % (pp * vp):
        raise ValueError(f"{n_layers} layers cannot be split into pp={pp} x vp={vp} chunks")
    per = n_layers // (pp * vp)
    first = (vp_stage * pp + pp_rank) * per
    return range(first, first + per)


def _is_first(pp_rank: int, vp_stage: int) -> bool:
    return pp_rank == 0 and vp_stage == 0


def _is_last(pp_rank: int, vp_stage: int, pp: int, vp: int) -> bool:
    return pp_rank == pp - 1 and vp_stage == vp - 1


def _rows(t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """Rank r's block of rows (dim 0) of t split into tp equal blocks."""
    return t.chunk(tp, dim=0)[r].clone()


def _cols(t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """Rank r's block of columns (dim 1)."""
    return t.chunk(tp, dim=1)[r].clone()


def _vocab_rows(w: torch.Tensor, vocab_padded: int, tp: int, r: int) -> torch.Tensor:
    """[V, D] -> rank r's rows of the zero-padded [Vp, D]."""
    padded = w.new_zeros(vocab_padded, w.shape[1])
    padded[: w.shape[0]] = w
    return _rows(padded, tp, r)


def _qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, cfg, tp: int, r: int) -> torch.Tensor:
    """omni's wq [H*d, D], wk, wv [K*d, D] -> rank r's fused linear_qkv [(Hl + 2 Kl) * d, D]."""
    H, K, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    D = wq.shape[1]
    q = wq.view(K, (H // K) * d, D)  # group g's query heads are g*H/K .. (g+1)*H/K - 1
    k = wk.view(K, d, D)
    v = wv.view(K, d, D)
    fused = torch.cat([q, k, v], dim=1)  # [K, (H/K + 2) * d, D]: [q heads of g | k_g | v_g]
    return _rows(fused, tp, r).reshape(-1, D)  # this rank's K/TP groups


def _unqkv(shards: list[torch.Tensor], cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of _qkv: every rank's fused [(Hl + 2 Kl) * d, D] -> (wq, wk, wv)."""
    H, K, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    D = shards[0].shape[1]
    fused = torch.cat([s.view(-1, (H // K + 2) * d, D) for s in shards], dim=0)  # [K, (H/K + 2) d, D]
    q, k, v = fused.split([(H // K) * d, d, d], dim=1)
    return q.reshape(H * d, D).clone(), k.reshape(K * d, D).clone(), v.reshape(K * d, D).clone()


def _block_norm_names(te: bool) -> tuple[str, str]:
    """Megatron names of a layer's two RMSNorm weights: the local spec's separate norms, or Transformer
    Engine's, fused into the following linear (``layer_norm_weight``; from megatron's TE spec, unverified
    here without TE)."""
    if te:
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def to_megatron(omni_state: dict, model_cfg, tp: int, tp_rank: int, pp: int, pp_rank: int,
                vp: int = 1, vp_stage: int = 0, *, te: bool = False) -> dict:
    """The megatron GPTModel ``state_dict`` (without ``_extra_state``) of model chunk (pp_rank,
    vp_stage) on TP rank ``tp_rank``, from an OmniDecoder ``state_dict``. ``te``: Transformer Engine
    spec names for the block norms."""
    cfg = model_cfg
    if cfg.n_kv_heads % tp or cfg.ffn_dim % tp:
        raise ValueError(f"tp={tp} must divide n_kv_heads={cfg.n_kv_heads} and ffn_dim={cfg.ffn_dim}")
    if cfg.swin_norm:
        raise ValueError("swin_norm has no megatron layout")
    s, r = omni_state, tp_rank
    attn_norm, mlp_norm = _block_norm_names(te)
    vocab_padded = padded_vocab_size(cfg.vocab_size, tp)
    out: dict[str, torch.Tensor] = {}
    first, last = _is_first(pp_rank, vp_stage), _is_last(pp_rank, vp_stage, pp, vp)
    if first:
        out["embedding.word_embeddings.weight"] = _vocab_rows(s["tok_embeddings.weight"], vocab_padded, tp, r)
    for j, i in enumerate(chunk_layers(cfg.n_layers, pp, vp, pp_rank, vp_stage)):
        o, m = f"layers.{i}.", f"decoder.layers.{j}."
        out[m + attn_norm] = s[o + "attention_norm.weight"].clone()
        out[m + "self_attention.linear_qkv.weight"] = _qkv(
            s[o + "attention.wq.weight"], s[o + "attention.wk.weight"], s[o + "attention.wv.weight"], cfg, tp, r)
        if cfg.qk_norm != "none":
            for src, dst in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
                for p in ("weight", "bias"):
                    key = f"{o}attention.{src}.{p}"
                    if key in s:  # per-head: this rank's heads; shared: the one [d] vector
                        t = s[key]
                        out[f"{m}self_attention.{dst}.{p}"] = _rows(t, tp, r) if cfg.qk_norm == "per_head" else t.clone()
        out[m + "self_attention.linear_proj.weight"] = _cols(s[o + "attention.wo.weight"], tp, r)
        out[m + mlp_norm] = s[o + "ffn_norm.weight"].clone()
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [_rows(s[o + "feed_forward.w1.weight"], tp, r), _rows(s[o + "feed_forward.w3.weight"], tp, r)])
        out[m + "mlp.linear_fc2.weight"] = _cols(s[o + "feed_forward.w2.weight"], tp, r)
    if last:
        out["decoder.final_layernorm.weight"] = s["norm.weight"].clone()
        if not cfg.tie_embeddings:
            out["output_layer.weight"] = _vocab_rows(s["output.weight"], vocab_padded, tp, r)
        elif not first:  # tied across stages: the last stage's copy of the embedding
            out["output_layer.weight"] = _vocab_rows(s["tok_embeddings.weight"], vocab_padded, tp, r)
    return out


def from_megatron(rank_states: dict, model_cfg, tp: int, pp: int, vp: int = 1, tied: str = "check", *,
                  te: bool = False) -> dict:
    """An OmniDecoder ``state_dict`` from every rank's megatron state: ``rank_states[(tp_rank, pp_rank,
    vp_stage)]`` (a state dict, ``_extra_state`` entries ignored). Inverse of :func:`to_megatron`.

    Gradients convert the same way (pass ``{name: param.grad}``); then ``tied='sum'``: with tied
    embeddings across stages the embedding's gradient is the sum of both copies'. ``tied='check'``
    (weights): the copies must be equal. Replicated tensors (norms, a shared QK-norm) are taken
    from TP rank 0.
    """
    cfg = model_cfg
    if tied not in ("check", "sum"):
        raise ValueError(f"tied must be 'check' or 'sum', got {tied!r}")
    expected = {(t, p, v) for t in range(tp) for p in range(pp) for v in range(vp)}
    if set(rank_states) != expected:
        raise ValueError(f"rank_states must have the keys (tp_rank, pp_rank, vp_stage) of tp={tp} pp={pp} vp={vp}; "
                         f"missing {sorted(expected - set(rank_states))}, extra {sorted(set(rank_states) - expected)}")
    V = cfg.vocab_size
    attn_norm, mlp_norm = _block_norm_names(te)

    def gather(pp_rank, vp_stage, key):
        return [rank_states[(t, pp_rank, vp_stage)][key] for t in range(tp)]

    out: dict[str, torch.Tensor] = {}
    out["tok_embeddings.weight"] = torch.cat(gather(0, 0, "embedding.word_embeddings.weight"))[:V].clone()
    for pp_rank in range(pp):
        for vp_stage in range(vp):
            for j, i in enumerate(chunk_layers(cfg.n_layers, pp, vp, pp_rank, vp_stage)):
                o, m = f"layers.{i}.", f"decoder.layers.{j}."
                rank0 = rank_states[(0, pp_rank, vp_stage)]
                out[o + "attention_norm.weight"] = rank0[m + attn_norm].clone()
                wq, wk, wv = _unqkv(gather(pp_rank, vp_stage, m + "self_attention.linear_qkv.weight"), cfg)
                out[o + "attention.wq.weight"], out[o + "attention.wk.weight"], out[o + "attention.wv.weight"] = wq, wk, wv
                out[o + "attention.wo.weight"] = torch.cat(gather(pp_rank, vp_stage, m + "self_attention.linear_proj.weight"), dim=1)
                if cfg.qk_norm != "none":
                    for src, dst in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
                        for p in ("weight", "bias"):
                            key = f"{m}self_attention.{dst}.{p}"
                            if key in rank0:
                                out[f"{o}attention.{src}.{p}"] = (
                                    torch.cat(gather(pp_rank, vp_stage, key)) if cfg.qk_norm == "per_head"
                                    else rank0[key].clone())
                out[o + "ffn_norm.weight"] = rank0[m + mlp_norm].clone()
                fc1 = [t.chunk(2, dim=0) for t in gather(pp_rank, vp_stage, m + "mlp.linear_fc1.weight")]
                out[o + "feed_forward.w1.weight"] = torch.cat([gate for gate, _ in fc1])
                out[o + "feed_forward.w3.weight"] = torch.cat([up for _, up in fc1])
                out[o + "feed_forward.w2.weight"] = torch.cat(gather(pp_rank, vp_stage, m + "mlp.linear_fc2.weight"), dim=1)
    last = rank_states[(0, pp - 1, vp - 1)]
    out["norm.weight"] = last["decoder.final_layernorm.weight"].clone()
    if "output_layer.weight" in last:
        head = torch.cat(gather(pp - 1, vp - 1, "output_layer.weight"))[:V]
        if not cfg.tie_embeddings:
            out["output.weight"] = head.clone()
        elif tied == "sum":
            out["tok_embeddings.weight"] += head
        elif not torch.equal(head, out["tok_embeddings.weight"]):
            raise ValueError("tied embeddings: the last stage's output_layer.weight differs from the embedding")
    elif not cfg.tie_embeddings:
        raise ValueError("untied model without output_layer.weight on the last stage")
    return out


__all__ = ["MEGATRON_VOCAB_DIVISOR", "padded_vocab_size", "chunk_layers", "to_megatron", "from_megatron"]
