"""Task heads behind routing tokens (:mod:`omni.decoders`): which are built, their K super-link
queries, their shapes and loss weights. Saved with a checkpoint's heads (``heads.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.errors import ConfigError


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
class HeadsConfig:
    """The heads a run builds (each off unless ``enabled``)."""

    det: DetectionHeadConfig = field(default_factory=DetectionHeadConfig)
    """The DETR detection head behind ``<det>`` (:mod:`omni.decoders.detection`)."""

    @property
    def enabled(self) -> dict[str, int]:
        """Routing token -> K of the enabled heads."""
        return {"<det>": self.det.n_queries} if self.det.enabled else {}
