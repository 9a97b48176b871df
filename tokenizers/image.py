"""VQ image tokenizer: a VQGAN-family conv autoencoder with a discrete bottleneck.

Esser, Rombach & Ommer, "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021
(https://arxiv.org/abs/2012.09841), on the VQ-VAE of van den Oord et al. 2017
(https://arxiv.org/abs/1711.00937). The layout (module and parameter names included) is the
taming-transformers one that Chameleon's image tokenizer (Make-a-Scene, Gafni et al. 2022,
https://arxiv.org/abs/2203.13131) and Hugging Face's ``ChameleonVQVAE`` keep, so Chameleon's
encoder weights load by name (:func:`omni.chameleon.import_chameleon_vqgan`)::

    images [B,3,H,W] in [0,1] -> x*2-1 -> encoder -> [B,latent,h,w] -> quant_conv -> [B,embed,h,w]
      -> quantizer -> codes [B,h,w]  (h = H / downsample)
    codes -> code vectors [B,embed,h,w] -> post_quant_conv -> decoder -> [B,3,H,W] -> (y+1)/2

Quantizers (``config.quantizer``), all but one from vector-quantize-pytorch:

* ``vq``: ``VectorQuantize`` with l2-normalized (cosine) codes looked up in a low dimension
  (Yu et al., "Vector-quantized Image Modeling with Improved VQGAN", https://arxiv.org/abs/2110.04627),
  EMA codebook updates, k-means initialization and dead-code restarts.
* ``fsq``: finite scalar quantization (Mentzer et al. 2023, https://arxiv.org/abs/2309.15505),
  optionally with MAGVIT-v2's entropy loss over its implicit codebook (:func:`fsq_entropy_loss`).
* ``lfq``: lookup-free quantization (Yu et al., MAGVIT-v2, https://arxiv.org/abs/2310.05737).
* ``nearest``: the plain VQ-VAE codebook (``nn.Embedding`` + nearest neighbour in l2), written
  here because Chameleon's codes must come out bit-for-bit equal: it evaluates the distance with
  the very expression transformers' ``ChameleonVQVAEVectorQuantizer`` uses.

The blocks, too, repeat Chameleon's arithmetic exactly (``x * sigmoid(x)`` rather than
``F.silu``, attention through ``bmm`` + softmax), since a last-bit difference can flip an argmin.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from omni.config.image_tokenizer import ImageTokenizerConfig
from omni.errors import OmniError
from omni.tokenizers.base import ImageTokenizer, settle_codebooks

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def swish(x: torch.Tensor) -> torch.Tensor:
    # Not F.silu: this is the expression Chameleon's encoder evaluates (bitwise-equal codes).
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.Module:
    """GroupNorm as in VQGAN; ``groups=0`` means no normalization (small models on short runs learn
    faster without it: per-image statistics of a small crop wash out its absolute color)."""
    if groups == 0:
        return nn.Identity()
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 shortcut where the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,Cin,H,W] -> [B,Cout,H,W]
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> same
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # [B,N,C]
        k = k.reshape(b, c, hh * ww)  # [B,C,N]
        w = F.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)  # [B,N(query),N(key)]
        v = v.reshape(b, c, hh * ww)  # [B,C,N]
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,H/2,W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,2H,2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """[B,3,H,W] -> [B,latent_channels,H/f,W/f], f = 2**(levels-1); Chameleon's ``ChameleonVQVAEEncoder``."""

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.base_channels, cfg.channel_multiplier
        self.local, self.f = cfg.local_encoder, cfg.downsample
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        res, block_in = cfg.image_size, ch
        self.down = nn.ModuleList()
        for level, m in enumerate(mult):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m, g, cfg.dropout))
                block_in = ch * m
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            down = nn.Module()
            down.block, down.attn = blocks, attns
            if level != len(mult) - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in, g) if cfg.mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, g, cfg.dropout)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.local:
            return self._encode(x)
        B, C, H, W = x.shape
        f = self.f
        # [B,3,H,W] -> [B*h*w,3,f,f]: every patch alone, so no code sees a neighbor
        p = x.reshape(B, C, H // f, f, W // f, f).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, f, f)
        z = self._encode(p)  # [B*h*w, D, 1, 1]
        return z.reshape(B, H // f, W // f, -1).permute(0, 3, 1, 2)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """[B,latent_channels,h,w] -> [B,3,h*f,w*f] (taming's decoder: one more res block per level)."""

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.base_channels, cfg.channel_multiplier
        block_in = ch * mult[-1]
        res = cfg.image_size // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in, g) if cfg.mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, g, cfg.dropout)
        up_levels = []
        for level in reversed(range(len(mult))):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[level], g, cfg.dropout))
                block_in = ch * mult[level]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            up = nn.Module()
            up.block, up.attn = blocks, attns
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            up_levels.insert(0, up)  # self.up[level], as in taming, so names match its checkpoints
        self.up = nn.ModuleList(up_levels)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class NearestQuantizer(nn.Module):
    """Plain VQ-VAE codebook: nearest code in l2, straight-through gradients (Chameleon's quantizer)."""

    def __init__(self, codebook_size: int, dim: int, beta: float):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: torch.Tensor):  # [B,D,h,w] -> ([B,D,h,w], codes [B,h,w], loss)
        b, _, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.dim)
        e = self.embedding.weight  # [K,D]
        # |z - e|^2 = z^2 + e^2 - 2 z.e, summed in this order, exactly as transformers does.
        dist = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(e**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, e.transpose(0, 1))
        )
        codes = torch.argmin(dist, dim=1)
        zq = self.embedding(codes).view(z.shape)
        # codebook term + beta * commitment term (van den Oord et al. 2017, eq. 3)
        loss = torch.mean((zq - z.detach()) ** 2) + self.beta * torch.mean((zq.detach() - z) ** 2)
        zq = z + (zq - z).detach()  # straight-through estimator
        return zq.permute(0, 3, 1, 2).contiguous(), codes.view(b, h, w), loss

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # [B,h,w] -> [B,D,h,w]
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


def build_quantizer(cfg: ImageTokenizerConfig) -> nn.Module:
    if cfg.quantizer == "nearest":
        return NearestQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.commitment_weight)
    if cfg.quantizer == "vq":
        from vector_quantize_pytorch import VectorQuantize

        return VectorQuantize(
            dim=cfg.embed_dim,
            codebook_size=cfg.codebook_size,
            codebook_dim=cfg.codebook_dim or None,
            use_cosine_sim=cfg.use_cosine_sim,
            decay=cfg.ema_decay,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            commitment_weight=cfg.commitment_weight,
        )
    if cfg.quantizer == "fsq":
        from vector_quantize_pytorch import FSQ

        return FSQ(levels=list(cfg.fsq_levels), dim=cfg.embed_dim)
    from vector_quantize_pytorch import LFQ

    return LFQ(dim=cfg.embed_dim, codebook_size=cfg.codebook_size,
               entropy_loss_weight=cfg.lfq_entropy_weight, commitment_loss_weight=cfg.commitment_weight)


def fsq_entropy_loss(fsq: nn.Module, z: torch.Tensor, temperature: float) -> torch.Tensor:
    """MAGVIT-v2's entropy penalty (Yu et al. 2023, https://arxiv.org/abs/2310.05737, eq. 5) on an
    FSQ's implicit codebook: E[H(q(c|z))] - H(E[q(c|z)]), with q a softmax over negative squared
    distances between the bounded latent and every code. The first term makes each assignment
    confident, the second spreads the batch over the codebook.

    ``fsq``: vector-quantize-pytorch's ``FSQ``; ``z``: its input [..., dim]. The bound is FSQ's
    eq. (1) before rounding, ``tanh(z + shift) * half_l - offset``, scaled like its codes
    (``implicit_codebook``, [n_codes, d] in [-1,1]). Cost: one [N, n_codes] distance matrix.
    """
    levels = fsq._levels.to(z.dtype)  # [d]
    zin = fsq.project_in(z).reshape(-1, levels.numel())  # [N,d]
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(fsq._levels % 2 == 0, 0.5, 0.0).to(z.dtype)
    bounded = (torch.tanh(zin + torch.atanh(offset / half_l)) * half_l - offset) / (fsq._levels // 2)  # [N,d]
    d2 = torch.cdist(bounded, fsq.implicit_codebook.to(z.dtype)).square()  # [N,n_codes]
    logp = F.log_softmax(-d2 / temperature, dim=-1)
    per_sample = -(logp.exp() * logp).sum(-1).mean()  # E[H(q)]
    mean_p = logp.exp().mean(0)  # [n_codes], the batch's code distribution
    batch = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()  # H(E[q])
    return per_sample - batch


class VQImageTokenizer(nn.Module, ImageTokenizer):
    """Images in [0,1] <-> a fixed grid of discrete codes. See the module docstring for the layout."""

    kind: ClassVar[str] = "vq-image"

    def __init__(self, config: ImageTokenizerConfig | None = None):
        super().__init__()
        self.config = cfg = config or ImageTokenizerConfig()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.quantize = build_quantizer(cfg)
        if cfg.has_decoder:
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
            self.decoder = Decoder(cfg)

    # --- ImageTokenizer interface ------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.n_codes

    @property
    def grid(self) -> tuple[int, int]:
        n = self.config.image_size // self.config.downsample
        return (n, n)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,H,W] in [0,1] at :attr:`image_size` -> long codes [B,h,w]."""
        if not self.training:
            settle_codebooks(self)  # encoding never changes the tokenizer
        _, codes, _ = self.quantize_latent(self.encoder(self._to_model(images)))
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """long codes [B,h,w] -> float images [B,3,H,W] in [0,1]."""
        if not self.config.has_decoder:
            raise OmniError("this image tokenizer has no pixel decoder (Hugging Face's Chameleon checkpoint "
                            "ships only the VQGAN encoder and codebook): it can encode images, not decode them")
        codes = torch.as_tensor(codes).long()
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise OmniError(f"decode expects codes [B,{self.grid[0]},{self.grid[1]}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise OmniError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return ((self.decode_latent(self.lookup(codes)) + 1) / 2).clamp(0, 1)

    # --- model pieces ------------------------------------------------------------------------
    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] -> [-1,1] (Chameleon's normalization: x*2-1), after checking the shape."""
        s = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s):
            raise OmniError(f"encode expects images [B,3,{s},{s}] in [0,1], got {tuple(images.shape)} "
                            f"(resize other sizes with .preprocess)")
        return images.float() * 2 - 1

    def quantize_latent(self, h: torch.Tensor, fsq_entropy: tuple[float, float] | None = None):
        """encoder output [B,latent,h,w] -> (code vectors [B,embed,h,w], codes [B,h,w], quantizer loss).

        ``fsq_entropy``: ``(weight, temperature)`` of :func:`fsq_entropy_loss`, added to an FSQ's
        loss in training (a training setting, ImageTrainConfig's, so it is not saved with the model).
        """
        z = self.quant_conv(h)
        kind = self.config.quantizer
        if kind == "nearest":
            return self.quantize(z)
        b, d, gh, gw = z.shape
        seq = z.flatten(2).transpose(1, 2)  # [B,N,D], N = h*w row-major
        if kind == "vq":
            zq, codes, loss = self.quantize(seq)
        elif kind == "fsq":
            zq, codes = self.quantize(seq)
            loss = seq.new_zeros(())
            if self.training and fsq_entropy is not None:
                weight, temperature = fsq_entropy
                loss = weight * fsq_entropy_loss(self.quantize, seq, temperature)
        else:  # lfq
            zq, codes, loss = self.quantize(seq)
        zq = zq.transpose(1, 2).reshape(b, d, gh, gw)
        return zq, codes.long().reshape(b, gh, gw), loss.reshape(())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B,h,w] -> code vectors [B,embed,h,w] (what the quantizer outputs for those codes)."""
        kind = self.config.quantizer
        if kind == "nearest":
            return self.quantize.lookup(codes)
        b, gh, gw = codes.shape
        flat = codes.reshape(b, gh * gw)
        if kind == "vq":
            seq = self.quantize.get_output_from_indices(flat)
        else:  # fsq, lfq
            seq = self.quantize.indices_to_codes(flat)
        return seq.transpose(1, 2).reshape(b, -1, gh, gw)

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        """code vectors [B,embed,h,w] -> images [B,3,H,W] in model space (about [-1,1])."""
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, images: torch.Tensor, fsq_entropy: tuple[float, float] | None = None):
        """Training pass: images [B,3,H,W] in [0,1] -> (reconstruction in [-1,1] space, codes, quantizer loss)."""
        zq, codes, qloss = self.quantize_latent(self.encoder(self._to_model(images)), fsq_entropy)
        return self.decode_latent(zq), codes, qloss

    # --- save / load ------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save

        from omni.config import save_config
        from omni.io import atomic_write_bytes

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        atomic_write_bytes(d / WEIGHTS_FILE, save(state, metadata={"kind": self.kind}))
        save_config(self.config, d / CONFIG_FILE)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> VQImageTokenizer:
        """Rebuild from :meth:`save`'s folder; returned in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from omni.config import load_config

        d = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (d / name).is_file():
                raise OmniError(f"{d} is not a vq-image tokenizer folder: {name} is missing")
        tok = cls(load_config(ImageTokenizerConfig, d / CONFIG_FILE))
        try:
            state = load_file(d / WEIGHTS_FILE)
        except (SafetensorError, OSError) as e:
            raise OmniError(f"cannot read {d / WEIGHTS_FILE}: {e}") from None
        missing, unexpected = tok.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise OmniError(f"{d / WEIGHTS_FILE} does not match {d / CONFIG_FILE}: "
                            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return tok.eval()

    def __repr__(self) -> str:  # nn.Module's repr prints every layer; keep it short
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        return (f"VQImageTokenizer({c.quantizer}, {self.codebook_size} codes, {c.image_size}px -> "
                f"{self.grid[0]}x{self.grid[1]}, {n / 1e6:.2f}M params)")
