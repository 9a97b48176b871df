"""The generation head behind ``<gen>``: a diffusers denoiser conditioned on the decoder's super-link states.

VisionLLM v2 (Wu et al. 2024, https://arxiv.org/abs/2406.08394, Sec. 3.3) routes "draw ..." to an
image generator: the decoder emits ``<gen>``, K learned super-link query embeddings follow it
(:mod:`omni.decoders.routing`), and the decoder's final hidden states at those K slots (the *query
states*) replace the text encoder's output of a latent diffusion model (Rombach et al., "High-
Resolution Image Synthesis with Latent Diffusion Models", 2022, https://arxiv.org/abs/2112.10752):
a small mapper takes them to the denoiser's cross-attention width (VisionLLM v2 maps 64 states to
Stable Diffusion's 77 x 768). The head's loss flows back into the query states, so into the decoder.

Data flow (B batch, K super-link slots, D decoder width, M mapped condition tokens (K for the
linear mapper, ``n_latents`` for the resampler), X cross-attention width, C x S x S the space diffused
in, p the pixel-unshuffle factor)::

    query_states [B, K, D] --mapper--> condition [B, M, X]
        linear:    LayerNorm(D), Linear D->X                                       (M = K)
        resampler: M learned latents attend once to LayerNorm+Linear(query states) (M = n_latents)
    training, per row with probability cond_dropout: condition <- null [M, X] (a learned parameter)
    target x0 [B, C, S, S] --pixel-unshuffle p--> [B, C*p*p, S/p, S/p], noised at a random t
        (noise_repeats r > 1: condition and target repeated to r*B rows, each noised on its own:
        MAR's diffusion batch multiplier, Li et al. 2024, https://arxiv.org/abs/2406.11838)
    denoiser(x_t, t, encoder_hidden_states=condition) -> prediction [B, C*p*p, S/p, S/p]
        objective "flow": x_t = (1-s) x0 + s eps, s ~ U(0,1), t = 1000 s; target v = eps - x0
                          (rectified flow, Liu et al. 2022, https://arxiv.org/abs/2209.03003, as
                          diffusers' FlowMatchEulerDiscreteScheduler reads it)
        objective "ddpm": x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t ~ U{0..999}, target eps
                          (Ho et al. 2020, https://arxiv.org/abs/2006.11239; linear betas)
    loss gen_diffusion = mean squared error of prediction and target
    sampling: N steps of FlowMatchEulerDiscreteScheduler ("flow") or DPMSolverMultistepScheduler
        ("ddpm"; Lu et al. 2022, https://arxiv.org/abs/2211.01095) from Gaussian noise, with
        classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598):
        pred = uncond + g * (cond - uncond); g = 1 runs the conditional pass alone
        -> [B, C, S, S] in the space diffused in

The space: the image tokenizer's quantized latent, not pixels. Measured with
``bench/diffusion_head.py`` (stand-in conditioning: embeddings of the caption's (color, shape)
pairs; 32 px toy scenes; the demo's image tokenizer, 8 x 8 codes of 64; 2 CPU cores, one arm
after another), judged on held-out test scenes:

    nice -n 19 .venv/bin/python bench/diffusion_head.py --arms latent,pixel --budget 270 --pixel-budget 120
    (a machine shared with other jobs, load 2-4: both arms ran far fewer steps than an idle machine gives)

    arm (UNet, flow)        params  train s  steps  steps/s  loss   guidance  1 obj   2-3 obj  s/image
    real test images                                                          100%    100%
    tokenizer round trip                                                      100%    100%
    latent 8x8x16           4.22M   270      161    0.60     0.80   1         11.7%   0.8%     0.023
    latent 8x8x16           4.22M   270      161    0.60     0.80   3         10.0%   1.7%     0.187
    pixel 32x32x3 (16x16x12) 4.92M  124       28    0.23     1.52   1         0.0%    0.0%     0.154
    pixel 32x32x3 (16x16x12) 4.92M  124       28    0.23     1.52   3         0.0%    0.0%     0.124

(180 held-out test scenes, 60 per object count; EMA weights; 20 Euler steps.) The latent arm trains
2.6x more steps per second and, after only 161 steps, draws the right object for 12% of held-out
one-object captions where pixel space (28 steps here; ~1.1k steps, 0% in 5 minutes in
shared/notes/heads-calibration.md) draws none: every sampled latent snaps to real codes, so its
images are always clean toy-world patches and the judge reads them. The per-image sampling times
are dominated by the machine's load (the guidance-3 latent row ran while another job peaked);
the denoiser's input is 16x smaller in cells in latent space.

Latent space (:func:`to_latent`, :func:`latent_to_codes`): the tokenizer's code vectors
(:meth:`VQImageTokenizer.lookup`, [B, E, h, w], E = embed_dim) of each image's codes, normalized
per channel by fixed statistics of training images (:class:`LatentStats`, kept in the head's
buffers so a checkpoint carries them). A sampled latent is denormalized and snapped to the nearest
code vector (l2) at each cell: the result is an ordinary image block of codes, which the decoder
reads as the document continues and the tokenizer's decoder turns into pixels. The code vectors of
a VQ with l2-normalized codes (the demo's) lie on a sphere of a few dimensions, so the snap also
removes the small errors of a short sampler.

The denoiser: a UNet2DConditionModel, chosen over the DiT (diffusers' Transformer2DModel with
adaLN-single) by the same bench at equal wall clock (short test runs shared the machine for part of it)::

    nice -n 5 .venv/bin/python bench/diffusion_head.py --arms latent,latent-dit --budget 150   (2026-12-06)

    arm          params  train s  steps  loss   guidance  1 obj   2-3 obj  s/image
    latent UNet  4.22M   150      325    0.40   1         43.3%   4.2%     0.050
    latent DiT   1.15M   150      504    0.30   1          8.3%   0.8%     0.032

Not yet settled by measurement: flow matching (a linear path; the note's cosine-schedule DDPM
diverged under DPM-Solver, its linear one was stable; ``--arms latent-ddpm`` compares), a linear mapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni.config.heads import DENOISERS, MAPPERS, OBJECTIVES, DiffusionHeadConfig, check_sampling
from omni.decoders.base import TaskHead
from omni.errors import OmniError

TRAIN_TIMESTEPS = 1000
"""Timesteps of the training schedule (both objectives; flow's t = 1000 * sigma)."""


@dataclass
class DiffusionOutput:
    """What :meth:`DiffusionHead.forward` returns: the denoiser's prediction and what it should be."""

    prediction: torch.Tensor
    """float [B, C*p*p, S/p, S/p]: predicted velocity ("flow") or noise ("ddpm")."""
    target: torch.Tensor
    """float, same shape: eps - x0 ("flow") or eps ("ddpm")."""
    timesteps: torch.Tensor
    """float [B]: the denoiser's timestep of each row (in [0, 1000])."""
    dropped: torch.Tensor
    """bool [B]: rows whose condition was the null condition."""


class Resampler(nn.Module):
    """One cross-attention layer of M learned latents over the projected query states (Perceiver-style)."""

    def __init__(self, dim: int, out: int, n_latents: int, head_dim: int):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(dim), nn.Linear(dim, out)
        self.latents = nn.Parameter(torch.randn(n_latents, out) * out**-0.5)
        self.attn = nn.MultiheadAttention(out, max(1, out // head_dim), batch_first=True)
        self.ffn = nn.Sequential(nn.LayerNorm(out), nn.Linear(out, 4 * out), nn.GELU(), nn.Linear(4 * out, out))
        self.out_norm = nn.LayerNorm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, K, D] -> [B, M, X]
        kv = self.proj(self.norm(x))  # [B, K, X]
        q = self.latents[None].expand(x.shape[0], -1, -1)  # [B, M, X]
        h = q + self.attn(q, kv, kv, need_weights=False)[0]
        return self.out_norm(h + self.ffn(h))


class DiffusionHead(TaskHead):
    """Denoiser behind ``<gen>``: K query states -> a sample in the diffused space (see the module docstring)."""

    kind = "diffusion"
    routing_token = "<gen>"

    def __init__(self, cfg: DiffusionHeadConfig | None = None, **overrides):
        super().__init__()
        if cfg is None:
            cfg = DiffusionHeadConfig(**overrides)
        elif overrides:
            raise OmniError(f"DiffusionHead takes a config or keyword overrides, not both (got {sorted(overrides)})")
        cfg.check()
        self.cfg = cfg
        X = cfg.cross_dim
        if cfg.mapper == "linear":
            self.mapper = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, X))
            m = cfg.n_queries
        else:
            self.mapper = Resampler(cfg.dim, X, cfg.n_latents, cfg.head_dim)
            m = cfg.n_latents
        self.null = nn.Parameter(torch.randn(m, X) * 0.02)  # the learned null condition [M, X]
        self.denoiser = _build_denoiser(cfg)
        # latent normalization (LatentStats); identity until set_latent_stats
        self.register_buffer("latent_mean", torch.zeros(cfg.channels))
        self.register_buffer("latent_std", torch.ones(cfg.channels))
        if cfg.objective == "ddpm":
            from diffusers import DDPMScheduler

            self.train_scheduler = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear")

    # --- conditioning ------------------------------------------------------------------------------
    def condition(self, query_states: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """query_states [B, K, D] -> cross-attention tokens [B, M, X]; rows where ``drop`` [B] is True get the null."""
        cfg = self.cfg
        if query_states.ndim != 3 or query_states.shape[-1] != cfg.dim:
            raise OmniError(f"query_states must be [B, K, D={cfg.dim}], got {tuple(query_states.shape)}")
        if query_states.shape[1] != cfg.n_queries:
            raise OmniError(f"query_states hold K={query_states.shape[1]} super-link states per row, the diffusion "
                            f"head was built for n_queries={cfg.n_queries}: the decoder's <gen> must be followed "
                            "by as many slots as the head reads")
        cond = self.mapper(query_states)  # [B, M, X]
        if drop is not None:
            cond = torch.where(drop[:, None, None], self.null.to(cond.dtype)[None], cond)
        return cond

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [B, C', S', S'], t [B] float in [0, 1000], cond [B, M, X] -> prediction [B, C', S', S']."""
        if self.cfg.denoiser == "unet":
            return self.denoiser(x, t, encoder_hidden_states=cond).sample
        return self.denoiser(x, encoder_hidden_states=cond, timestep=t,
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    # --- training --------------------------------------------------------------------------------
    def forward(self, query_states: torch.Tensor, context_states: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, *, target: torch.Tensor,
                generator: torch.Generator | None = None) -> DiffusionOutput:
        """One denoising training pass: query_states [B, K, D] and target [B, C, S, S] (the clean sample
        in the diffused space, normalized latent or pixels in [-1, 1]) -> :class:`DiffusionOutput`.

        ``context_states`` / ``context_mask`` are not read (the condition is the query states alone,
        as in VisionLLM v2's generator). ``generator`` draws the noise, the timesteps and which rows
        get the null condition (None: torch's global generator).
        """
        cfg = self.cfg
        B = query_states.shape[0]
        if target.ndim != 4 or tuple(target.shape[1:]) != (cfg.channels, cfg.size, cfg.size):
            raise OmniError(f"target must be [B, C={cfg.channels}, {cfg.size}, {cfg.size}] (the space diffused in), "
                            f"got {tuple(target.shape)}")
        if target.shape[0] != B:
            raise OmniError(f"query_states hold {B} rows but target {target.shape[0]}")
        dev = query_states.device
        drop = torch.rand(B, generator=generator, device=dev) < cfg.cond_dropout  # [B]
        cond = self.condition(query_states, drop if self.training else None)  # [B, M, X]
        x0 = self._pack(target.to(cond.dtype))  # [B, C', S', S']
        if self.training and cfg.noise_repeats > 1:  # MAR's batch multiplier: r noise draws per condition
            r = cfg.noise_repeats
            cond, x0, drop = cond.repeat(r, 1, 1), x0.repeat(r, 1, 1, 1), drop.repeat(r)  # [r*B, ...]
            B = r * B
        eps = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        if cfg.objective == "flow":
            s = torch.rand(B, generator=generator, device=dev, dtype=x0.dtype)  # sigma in [0, 1)
            xt = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps
            t, goal = s * TRAIN_TIMESTEPS, eps - x0
        else:
            ti = torch.randint(0, TRAIN_TIMESTEPS, (B,), generator=generator, device=dev)
            xt = self.train_scheduler.add_noise(x0, eps, ti)
            t, goal = ti.to(x0.dtype), eps
        pred = self._denoise(xt, t, cond)
        return DiffusionOutput(prediction=pred, target=goal, timesteps=t, dropped=drop & self.training)

    def loss(self, outputs: DiffusionOutput, targets=None) -> dict[str, torch.Tensor]:
        """``gen_diffusion``: mean squared error of the prediction and its target (both in ``outputs``;
        ``targets`` is not read: the clean sample went into :meth:`forward`)."""
        return {"gen_diffusion": F.mse_loss(outputs.prediction.float(), outputs.target.float())}

    # --- sampling --------------------------------------------------------------------------------
    def sampler(self, steps: int):
        """A fresh diffusers scheduler set to ``steps`` steps (schedulers keep state: one per sample call)."""
        if self.cfg.objective == "flow":
            from diffusers import FlowMatchEulerDiscreteScheduler

            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=1.0)
        else:
            from diffusers import DPMSolverMultistepScheduler

            sched = DPMSolverMultistepScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear",
                                                algorithm_type="dpmsolver++", solver_order=2)
        sched.set_timesteps(steps)
        return sched

    @torch.no_grad()
    def sample(self, query_states: torch.Tensor, generator: torch.Generator | None = None,
               guidance: float | None = None, steps: int | None = None) -> torch.Tensor:
        """query_states [B, K, D] -> samples [B, C, S, S] in the space diffused in (for the latent:
        normalized; :func:`latent_to_codes` with :attr:`latent_stats` snaps them to codes).

        ``guidance`` (default: the config's): classifier-free guidance scale, >= 0; at 1 only the
        conditional pass runs. ``steps`` (default: the config's): sampler steps. ``generator`` draws
        the starting noise: the same generator state gives the same samples.
        """
        cfg = self.cfg
        guidance = cfg.guidance if guidance is None else guidance
        steps = cfg.steps if steps is None else steps
        check_sampling(guidance, steps)
        cond = self.condition(query_states)  # [B, M, X]
        B = cond.shape[0]
        if guidance != 1.0:
            cond = torch.cat((self.null.to(cond.dtype)[None].expand(B, -1, -1), cond))  # [2B, M, X]: uncond, cond
        side = cfg.size // cfg.unshuffle
        shape = (B, cfg.channels * cfg.unshuffle**2, side, side)
        dev = query_states.device
        x = torch.randn(shape, generator=generator, device=generator.device if generator is not None else dev,
                        dtype=cond.dtype).to(dev)
        sched = self.sampler(steps)
        x = x * getattr(sched, "init_noise_sigma", 1.0)  # DPM-Solver: 1; flow starts at sigma 1
        for t in sched.timesteps:
            inp = x if guidance == 1.0 else torch.cat((x, x))
            inp = sched.scale_model_input(inp, t) if hasattr(sched, "scale_model_input") else inp
            tt = torch.full((inp.shape[0],), float(t), device=dev, dtype=cond.dtype)
            pred = self._denoise(inp, tt, cond)
            if guidance != 1.0:
                uncond, con = pred.chunk(2)
                pred = uncond + guidance * (con - uncond)
            x = sched.step(pred, t, x).prev_sample
        return self._unpack(x)

    # --- latent statistics -----------------------------------------------------------------------
    @property
    def latent_stats(self) -> LatentStats:
        """The normalization of the diffused latent (identity until :meth:`set_latent_stats`)."""
        return LatentStats(self.latent_mean, self.latent_std)

    def set_latent_stats(self, stats: LatentStats) -> None:
        if stats.mean.shape != (self.cfg.channels,) or stats.std.shape != (self.cfg.channels,):
            raise OmniError(f"latent stats must have C={self.cfg.channels} channels, got {tuple(stats.mean.shape)}")
        self.latent_mean.copy_(stats.mean)
        self.latent_std.copy_(stats.std)

    # --- helpers ---------------------------------------------------------------------------------
    def _pack(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, S, S] -> [B, C*p*p, S/p, S/p]
        return F.pixel_unshuffle(x, self.cfg.unshuffle) if self.cfg.unshuffle > 1 else x

    def _unpack(self, x: torch.Tensor) -> torch.Tensor:  # [B, C*p*p, S/p, S/p] -> [B, C, S, S]
        return F.pixel_shuffle(x, self.cfg.unshuffle) if self.cfg.unshuffle > 1 else x


def _build_denoiser(cfg: DiffusionHeadConfig) -> nn.Module:
    side, ch = cfg.size // cfg.unshuffle, cfg.channels * cfg.unshuffle**2
    if cfg.denoiser == "unet":
        from diffusers import UNet2DConditionModel

        n = len(cfg.widths)
        return UNet2DConditionModel(
            sample_size=side, in_channels=ch, out_channels=ch, block_out_channels=cfg.widths,
            down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
            layers_per_block=cfg.layers, cross_attention_dim=cfg.cross_dim,
            attention_head_dim=[w // cfg.head_dim for w in cfg.widths],  # diffusers reads this as heads
        )
    from diffusers import Transformer2DModel

    width = cfg.widths[0]
    return Transformer2DModel(
        num_attention_heads=width // cfg.head_dim, attention_head_dim=cfg.head_dim, in_channels=ch, out_channels=ch,
        num_layers=cfg.layers, cross_attention_dim=cfg.cross_dim, sample_size=side, patch_size=cfg.patch,
        norm_type="ada_norm_single", use_additional_conditions=False, activation_fn="gelu-approximate",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )


# ----------------------------------------------------------------------------------------------
# The tokenizer's latent
# ----------------------------------------------------------------------------------------------
@dataclass
class LatentStats:
    """Per-channel mean and std of the code vectors of training images: the latent is (z - mean) / std."""

    mean: torch.Tensor
    """float [E]."""
    std: torch.Tensor
    """float [E], > 0."""

    @classmethod
    @torch.no_grad()
    def of(cls, tokenizer, images: torch.Tensor, batch_size: int = 256) -> LatentStats:
        """Statistics of ``to_latent(tokenizer, images)`` (images [N, 3, H, W] in [0, 1])."""
        z = torch.cat([to_latent(tokenizer, images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        return cls(z.mean((0, 2, 3)), z.std((0, 2, 3)).clamp_min(1e-6))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:  # [B, E, h, w]
        return (z - self.mean.to(z)[:, None, None]) / self.std.to(z)[:, None, None]

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:  # [B, E, h, w]
        return z * self.std.to(z)[:, None, None] + self.mean.to(z)[:, None, None]


@torch.no_grad()
def to_latent(tokenizer, images: torch.Tensor, stats: LatentStats | None = None) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> the tokenizer's quantized latent [B, E, h, w]: the code vector
    of each code (normalized by ``stats`` when given)."""
    z = tokenizer.lookup(tokenizer.encode(images))
    return z if stats is None else stats.normalize(z)


@torch.no_grad()
def code_vectors(tokenizer) -> torch.Tensor:
    """Every code's vector, float [n_codes, E] (what :meth:`VQImageTokenizer.lookup` gives code i)."""
    n = tokenizer.codebook_size
    dev = next(tokenizer.parameters()).device
    return tokenizer.lookup(torch.arange(n, device=dev).reshape(1, n, 1))[0, :, :, 0].T.contiguous()


@torch.no_grad()
def latent_to_codes(tokenizer, latent: torch.Tensor, stats: LatentStats | None = None) -> torch.Tensor:
    """A latent [B, E, h, w] (normalized by ``stats`` when given) -> codes [B, h, w]: at each cell the code
    whose vector is nearest in l2 (the VQ lookup); ``tokenizer.decode`` makes the pixels."""
    if stats is not None:
        latent = stats.denormalize(latent)
    table = code_vectors(tokenizer).to(latent)  # [n, E]
    B, E, h, w = latent.shape
    if E != table.shape[1]:
        raise OmniError(f"latent has {E} channels, the tokenizer's code vectors {table.shape[1]}")
    flat = latent.permute(0, 2, 3, 1).reshape(-1, E)  # [B*h*w, E]
    return torch.cdist(flat, table).argmin(-1).reshape(B, h, w)


__all__ = ["DENOISERS", "MAPPERS", "OBJECTIVES", "DiffusionHead", "DiffusionHeadConfig", "DiffusionOutput",
           "LatentStats", "code_vectors", "latent_to_codes", "to_latent"]
