"""Task heads behind routing tokens (:mod:`omni.decoders`): which are built, their K super-link
queries, their shapes and loss weights. Saved with a checkpoint's heads (``heads.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.errors import ConfigError

DENOISERS = ("unet", "dit")
"""``unet``: diffusers' UNet2DConditionModel; ``dit``: diffusers' Transformer2DModel with adaLN-single (PixArt-alpha)."""
OBJECTIVES = ("flow", "ddpm")
"""``flow``: flow matching, velocity target, Euler sampler; ``ddpm``: linear-beta DDPM, noise target, DPM-Solver++."""
MAPPERS = ("linear", "resampler")
"""How query states become cross-attention tokens (see omni.decoders.diffusion)."""


@dataclass
class DetectionHeadConfig:
    """Shape, loss weights and limits of :class:`DetectionHead` (defaults: DETR's weights, toy sizes)."""

    enabled: bool = False
    """Build the head and train it on the ``<det>`` documents of the data (``train.loss_weights.det``)."""
    n_queries: int = 4
    """K: super-link queries after each ``<det>`` (VisionLLM v2: 4); the data must be written with the
    same K (``data.preprocess.det_queries``)."""
    width: int = 128
    """d: the head's own width; a multiple of 4 (the 2-D sine positions use d/4 frequencies per axis
    and sin/cos) and of ``n_heads``."""
    n_objects: int = 16
    """Q: object queries, the most boxes one (image, request) pair can get."""
    n_layers: int = 2
    """Transformer decoder layers; each predicts boxes (auxiliary losses)."""
    n_heads: int = 4
    """Attention heads of each decoder layer."""
    ffn_dim: int = 512
    """Hidden size of each decoder layer's feed-forward block."""
    dropout: float = 0.0
    """Dropout in the decoder layers (DETR: 0.1; 0 for the small data of the toy world)."""
    grid: tuple[int, int] | None = None
    """Default (h, w) of the image-token grid, used when :meth:`DetectionHead.forward` gets no
    ``grid``; N context states must equal h*w. None: every call passes its grid."""
    class_weight: float = 1.0
    """Weight of the object/no-object cross-entropy, in the loss and in the matching cost."""
    no_object_weight: float = 0.1
    """Class weight of 'no object' in the cross-entropy (DETR's eos_coef): most queries are
    unmatched, and at full weight they teach the head to predict nothing."""
    l1_weight: float = 5.0
    """Weight of the L1 distance of matched (cx, cy, w, h), in the loss and in the matching cost."""
    giou_weight: float = 2.0
    """Weight of 1 - GIoU of matched boxes, in the loss and in the matching cost."""
    aux_loss: bool = True
    """Add every decoder layer's loss (each matched on its own), not only the last layer's."""
    max_objects: int | None = None
    """Most target boxes one (image, request) pair may have; more is an error. None: n_objects.
    At most n_objects, since every box needs a query of its own."""

    def __post_init__(self):
        for name in ("n_queries", "width", "n_objects", "n_layers", "n_heads", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"heads.det.{name}={value!r} is invalid: expected a positive integer")
        if self.width % 4 or self.width % self.n_heads:
            raise ConfigError(f"heads.det.width={self.width} must be a multiple of 4 (2-D sine positions) "
                              f"and of n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"heads.det.dropout={self.dropout} is invalid: expected 0 <= dropout < 1")
        for name in ("class_weight", "no_object_weight", "l1_weight", "giou_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"heads.det.{name}={getattr(self, name)} is invalid: expected >= 0")
        if self.grid is not None:
            self.grid = check_grid(self.grid, "heads.det.grid")
        # (not filled in here: a recipe merged over the defaults would keep the default n_objects' value)
        if self.max_objects is not None and not 1 <= self.max_objects <= self.n_objects:
            raise ConfigError(f"heads.det.max_objects={self.max_objects} is invalid: expected 1.."
                              f"{self.n_objects} (n_objects: each box needs its own object query)")


def max_boxes(cfg: DetectionHeadConfig) -> int:
    """The most target boxes one (image, request) pair may have: ``max_objects``, else ``n_objects``."""
    return cfg.max_objects if cfg.max_objects is not None else cfg.n_objects


def check_grid(grid, what: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={grid!r} is invalid: expected (h, w), two positive integers") from None
    if h < 1 or w < 1:
        raise ConfigError(f"{what}={grid!r} is invalid: expected (h, w), two positive integers")
    return h, w


@dataclass
class DiffusionHeadConfig:
    """Shape, objective and sampler of :class:`omni.decoders.diffusion.DiffusionHead` behind ``<gen>``.

    In a run (``heads.gen``), ``dim``, ``channels`` and ``size`` are set when the head is built: the
    decoder's hidden size and the image tokenizer's latent (embed_dim, code grid side)."""

    enabled: bool = False
    """Build the head and train it on the ``<gen>`` documents of the data (``train.loss_weights.gen``)."""
    dim: int = 128
    """D: hidden size of the decoder whose query states condition the head (a run: model.dim)."""
    n_queries: int = 64
    """K: super-link query states per ``<gen>`` (VisionLLM v2: 64); the data must be written with the
    same K (``data.preprocess.gen_queries``)."""
    channels: int = 16
    """C: channels of the space diffused in (a run: the image tokenizer's embed_dim; 3 for pixels)."""
    size: int = 8
    """S: side of the space diffused in (a run: the image tokenizer's code grid; the image side for pixels)."""
    unshuffle: int = 1
    """p: pixel-unshuffle factor before the denoiser (S/p x S/p cells of C*p*p channels): a cheaper
    denoiser on pixels. 1 for the latent."""
    denoiser: str = "unet"
    """One of :data:`DENOISERS`."""
    widths: tuple[int, ...] = (64, 128)
    """unet: block_out_channels, one down and one up block per entry (all with cross-attention);
    dit: only widths[0] is read, the transformer's width (heads * head_dim)."""
    layers: int = 1
    """unet: layers_per_block; dit: transformer blocks."""
    head_dim: int = 32
    """Attention head size of the denoiser's attention layers (width / head_dim heads)."""
    patch: int = 1
    """dit: patch size (S/p must be a multiple); unet: unused."""
    cross_dim: int = 64
    """X: cross-attention width (the mapper's output)."""
    mapper: str = "linear"
    """One of :data:`MAPPERS`."""
    n_latents: int = 16
    """M of the resampler (learned latents); the linear mapper keeps M = K."""
    cond_dropout: float = 0.1
    """Share of training rows whose condition is replaced by the learned null condition (classifier-free guidance)."""
    noise_repeats: int = 1
    """Training: each target is noised this many times (own timestep and noise each) under its one
    condition, MAR's diffusion batch multiplier (Li et al. 2024, arXiv 2406.11838: 4). The denoiser's
    cost on a CPU is mostly per call, not per row, so more noise draws per decoder pass are cheap;
    the loss is a mean over all of them."""
    objective: str = "flow"
    """One of :data:`OBJECTIVES`."""
    guidance: float = 1.0
    """Default classifier-free guidance scale of :meth:`DiffusionHead.sample` (1: conditional only; >= 0)."""
    steps: int = 20
    """Default sampling steps of :meth:`DiffusionHead.sample` (>= 1)."""

    def __post_init__(self):
        self.widths = tuple(self.widths)
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for name in ("dim", "n_queries", "channels", "size", "unshuffle", "layers", "head_dim", "patch",
                     "cross_dim", "n_latents", "steps", "noise_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"heads.gen.{name}={value!r} is invalid: expected a positive integer")
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ConfigError(f"heads.gen.widths={self.widths!r} is invalid: expected positive integers")
        for name, value, allowed in (("denoiser", self.denoiser, DENOISERS), ("objective", self.objective, OBJECTIVES),
                                     ("mapper", self.mapper, MAPPERS)):
            if value not in allowed:
                raise ConfigError(f"heads.gen.{name}={value!r} is invalid: choose from {', '.join(allowed)}")
        if self.size % self.unshuffle:
            raise ConfigError(f"heads.gen.size={self.size} is not a multiple of unshuffle={self.unshuffle}")
        side = self.size // self.unshuffle
        if self.denoiser == "unet":
            down = 2 ** (len(self.widths) - 1)
            if side % down:
                raise ConfigError(f"heads.gen: a {len(self.widths)}-level UNet halves the side "
                                  f"{len(self.widths) - 1} times; size/unshuffle={side} is not a multiple of {down}")
            if any(w % self.head_dim for w in self.widths):
                raise ConfigError(f"heads.gen.widths={self.widths} must be multiples of head_dim={self.head_dim}")
            if any(w % 32 for w in self.widths):  # diffusers' GroupNorm groups: 32 by default, kept
                raise ConfigError(f"heads.gen.widths={self.widths} must be multiples of 32 (GroupNorm groups)")
        else:
            if side % self.patch:
                raise ConfigError(f"heads.gen.size/unshuffle={side} is not a multiple of patch={self.patch}")
            if self.widths[0] % self.head_dim:
                raise ConfigError(f"heads.gen.widths[0]={self.widths[0]} must be a multiple of "
                                  f"head_dim={self.head_dim}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"heads.gen.cond_dropout={self.cond_dropout} is invalid: expected 0 <= p < 1")
        check_sampling(self.guidance, self.steps)


def check_sampling(guidance, steps) -> None:
    """Refuse a guidance scale < 0 (or not finite) and a step count < 1, with the reason."""
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not guidance >= 0 \
            or guidance == float("inf"):
        raise ConfigError(f"diffusion guidance={guidance!r} is invalid: expected a finite scale >= 0 "
                          "(1: conditional only, 0: unconditional, > 1: classifier-free guidance)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"diffusion steps={steps!r} is invalid: expected a positive integer of sampler steps")


@dataclass
class HeadsConfig:
    """The heads a run builds (each off unless ``enabled``)."""

    det: DetectionHeadConfig = field(default_factory=DetectionHeadConfig)
    """The DETR detection head behind ``<det>`` (:mod:`omni.decoders.detection`)."""
    gen: DiffusionHeadConfig = field(default_factory=DiffusionHeadConfig)
    """The diffusion head behind ``<gen>`` (:mod:`omni.decoders.diffusion`)."""

    @property
    def enabled(self) -> dict[str, int]:
        """Routing token -> K of the enabled heads."""
        out = {"<det>": self.det.n_queries} if self.det.enabled else {}
        return {**out, "<gen>": self.gen.n_queries} if self.gen.enabled else out
