"""Decoder config: the early-fusion transformer of :mod:`omni.model` (Chameleon's recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import check, check_choice

QK_NORMS = ("per_head", "shared", "none")
QK_NORM_TYPES = ("layernorm", "rmsnorm")
ROPE_KINDS = ("rope", "yarn", "mrope", "mrope_plus")
"""Position encodings (omni.rope): 1-D RoPE, YaRN, M-RoPE (Qwen2-VL), M-RoPE++ (GIRAFFE's paper form)."""
ROPE_SCALINGS = ("none", "linear", "ntk")
"""Scalings of kind 'rope': none, position interpolation, NTK-aware base scaling."""
MROPE_KINDS = ("mrope", "mrope_plus")
"""Kinds that rotate by 3-D (temporal, height, width) positions."""


@dataclass
class RopeConfig:
    """Which rotary position encoding the decoder uses (``model.rope.*``; the math is omni.rope's).

    The default (kind 'rope', scaling 'none') is plain RoPE of base ``model.rope_theta``: a config
    without a ``rope`` section computes what it always did.
    """

    kind: str = "rope"
    """'rope' (1-D RoPE, optionally scaled), 'yarn' (Peng et al. 2023), 'mrope' (Qwen2-VL: frequency sections rotated by (time, row, column) positions) or 'mrope_plus' (GIRAFFE's M-RoPE++: M-RoPE with per-section extension)."""
    scaling: str = "none"
    """For kind 'rope': 'none', 'linear' (positions divided by factor, Chen et al. 2023) or 'ntk' (base theta * factor ** (d / (d - 2)))."""
    factor: float = 1.0
    """Context extension ratio s (new context / trained context) of scaling linear/ntk, kind yarn and kind mrope_plus; 1 changes nothing."""
    original_max_position_embeddings: int | None = None
    """Kind 'yarn': the context the model was trained at before extension (sets YaRN's correction dims); required for yarn."""
    beta_fast: float = 32.0
    """Kind 'yarn': frequencies that turn more than beta_fast times over the original context are kept (extrapolated)."""
    beta_slow: float = 1.0
    """Kind 'yarn': frequencies that turn fewer than beta_slow times over the original context are divided by factor (interpolated)."""
    mscale: float = 1.0
    """Kind 'yarn': attention factor (0.1 * mscale * ln(factor) + 1) / (0.1 * mscale_all_dim * ln(factor) + 1) multiplies cos and sin (megatron-core's)."""
    mscale_all_dim: float = 0.0
    """Kind 'yarn': see mscale (DeepSeek-V2/V3 set both; 0 leaves the factor 0.1 * mscale * ln(factor) + 1)."""
    mrope_section: list[int] | None = None
    """Kinds 'mrope'/'mrope_plus': frequency pairs given to (time, height, width), summing to head_dim / 2; null: Qwen2-VL's 16/24/24 of 64, scaled to head_dim / 2."""

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", ROPE_KINDS)
        check_choice(self.scaling, "scaling", ROPE_SCALINGS)
        check(self.scaling == "none" or self.kind == "rope", "scaling", self.scaling,
              f"'none' with kind {self.kind!r} (scaling applies to kind 'rope'; kinds 'yarn' and 'mrope_plus' "
              "scale by themselves)")
        check(self.factor >= 1.0, "factor", self.factor, ">= 1 (the context extension ratio)")
        uses_factor = (self.kind == "rope" and self.scaling != "none") or self.kind in ("yarn", "mrope_plus")
        check(uses_factor or self.factor == 1.0, "factor", self.factor,
              f"1.0 with kind {self.kind!r} and scaling {self.scaling!r}, which do not scale (factor is used by "
              "scaling 'linear'/'ntk' of kind 'rope', and by kinds 'yarn', 'mrope_plus')")
        yarn = self.kind == "yarn"
        if self.original_max_position_embeddings is not None or yarn:
            omp = self.original_max_position_embeddings
            check(yarn, "original_max_position_embeddings", omp, "null (it is used by kind 'yarn' only)")
            check(omp is not None and omp >= 1, "original_max_position_embeddings", omp,
                  "the context length the model was trained at before extension (an int >= 1): kind 'yarn' needs it")
        check(self.beta_slow > 0, "beta_slow", self.beta_slow, "> 0")
        check(self.beta_fast > self.beta_slow, "beta_fast", self.beta_fast, f"> beta_slow={self.beta_slow}")
        check(self.mscale > 0, "mscale", self.mscale, "> 0")
        check(self.mscale_all_dim >= 0, "mscale_all_dim", self.mscale_all_dim, ">= 0")
        if not yarn:
            for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("mscale", 1.0), ("mscale_all_dim", 0.0)):
                check(getattr(self, name) == default, name, getattr(self, name),
                      f"its default {default} with kind {self.kind!r} (it is used by kind 'yarn' only)")
        if self.mrope_section is not None:
            sec = self.mrope_section
            check(self.kind in MROPE_KINDS, "mrope_section", sec,
                  f"null with kind {self.kind!r} (sections are used by kinds 'mrope', 'mrope_plus')")
            check(len(sec) == 3 and all(isinstance(n, int) and n >= 0 for n in sec), "mrope_section", sec,
                  "3 non-negative ints [time, height, width] (frequency pairs of each section)")


@dataclass
class ModelConfig:
    """OmniDecoder shape and options (the planned megatron-core backend is to read the same fields)."""

    vocab_size: int = 640
    """Rows of the embedding and output head: the unified vocab size, padding included."""
    dim: int = 64
    """Hidden size (d_model)."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Query heads; head_dim = dim / n_heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads. n_kv_heads = n_heads is MHA."""
    ffn_dim: int = 172
    """Inner size of the SwiGLU MLP (gate and up projections each have this many outputs)."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorms (block norms and final norm)."""
    qk_norm: str = "per_head"
    """QK-norm over head_dim: 'per_head' (a weight per head, Chameleon), 'shared' (one weight for all heads, megatron-core qk_layernorm) or 'none'."""
    qk_norm_type: str = "layernorm"
    """QK-norm kind: 'layernorm' (weight and bias, Chameleon) or 'rmsnorm' (weight only)."""
    qk_norm_eps: float = 1e-5
    """Epsilon of the QK-norm."""
    swin_norm: bool = False
    """Chameleon's norm re-ordering: h = x + norm(attn(x)); out = h + norm(mlp(h)) (the 34B recipe)."""
    rope_theta: float = 10000.0
    """RoPE base frequency theta (of every rope kind)."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """The position encoding: plain RoPE by default, or a long-context variant (omni.rope)."""
    max_seq_len: int = 4096
    """Longest sequence (training context); used for FLOP counts and the KV cache default."""
    tie_embeddings: bool = False
    """Share the output head's weight with the token embedding (Chameleon: untied)."""
    dropout: float = 0.0
    """Dropout on the residual branches (attention output and MLP output) during training."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities during training."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights; output projections are scaled by 1/sqrt(2*n_layers)."""
    z_loss: float = 1e-5
    """Coefficient of the z-loss, z * mean(logsumexp(logits)^2) over the loss tokens (Chameleon: 1e-5); 0 disables it."""

    def __post_init__(self) -> None:
        check(self.vocab_size >= 1, "vocab_size", self.vocab_size, ">= 1")
        check(self.dim >= 1, "dim", self.dim, ">= 1")
        check(self.n_layers >= 1, "n_layers", self.n_layers, ">= 1")
        check(self.n_heads >= 1 and self.dim % self.n_heads == 0, "n_heads", self.n_heads,
              f"a positive divisor of dim={self.dim}")
        check((self.dim // max(self.n_heads, 1)) % 2 == 0, "n_heads", self.n_heads,
              f"a divisor of dim={self.dim} giving an even head_dim (RoPE rotates pairs)")
        check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
              f"a positive divisor of n_heads={self.n_heads}")
        check(self.ffn_dim >= 1, "ffn_dim", self.ffn_dim, ">= 1")
        check(0 < self.norm_eps < 1, "norm_eps", self.norm_eps, "in (0, 1)")
        check_choice(self.qk_norm, "qk_norm", QK_NORMS)
        check_choice(self.qk_norm_type, "qk_norm_type", QK_NORM_TYPES)
        check(0 < self.qk_norm_eps < 1, "qk_norm_eps", self.qk_norm_eps, "in (0, 1)")
        check(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")
        if isinstance(self.rope, dict):  # built from a plain mapping rather than through load_config
            self.rope = RopeConfig(**self.rope)
        half = self.head_dim // 2
        if self.rope.mrope_section is not None:
            check(sum(self.rope.mrope_section) == half, "rope.mrope_section", self.rope.mrope_section,
                  f"sections summing to head_dim / 2 = {half} (frequency pairs of a head)")
        check(self.rope.scaling != "ntk" or self.head_dim > 2, "rope.scaling", self.rope.scaling,
              f"not 'ntk' with head_dim={self.head_dim} (its exponent d / (d - 2) needs head_dim > 2)")
        check(self.max_seq_len >= 1, "max_seq_len", self.max_seq_len, ">= 1")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        check(0 <= self.attention_dropout < 1, "attention_dropout", self.attention_dropout, "in [0, 1)")
        check(self.init_std > 0, "init_std", self.init_std, "> 0")
        check(self.z_loss >= 0, "z_loss", self.z_loss, ">= 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def split_problem(self, tensor: int, pipeline: int, virtual: int = 1, cli: bool = False) -> str | None:
        """Why megatron-core cannot split this model over ``tensor`` x ``pipeline`` (x ``virtual``
        chunks per stage) ranks, or None: the one rule of `omni train` (parallel.* keys),
        `omni model plan` and `omni convert to-megatron` (``cli``: --flags). The vocab needs no
        rule: the megatron model pads it (parallel/megatron/convert.py)."""
        def key(name: str, value: int) -> str:
            return f"--{name.replace('_', '-')} {value}" if cli else f"parallel.{name}={value}"

        field = (lambda n: n) if cli else (lambda n: f"model.{n}")
        for name, value in (("tensor", tensor), ("pipeline", pipeline), ("virtual_pipeline", virtual)):
            if value < 1:
                return f"{key(name, value)} must be >= 1"
        if self.n_heads % tensor or self.n_kv_heads % tensor:
            return (f"{key('tensor', tensor)} must divide {field('n_heads')}={self.n_heads} and "
                    f"{field('n_kv_heads')}={self.n_kv_heads} (a tensor-parallel rank holds whole query groups)")
        if self.ffn_dim % tensor:
            return f"{key('tensor', tensor)} must divide {field('ffn_dim')}={self.ffn_dim}"
        if self.n_layers % (pipeline * virtual):
            chunks = key("pipeline", pipeline) + (f" x {key('virtual_pipeline', virtual)}" if virtual > 1 else "")
            return f"{chunks} must divide {field('n_layers')}={self.n_layers} (every model chunk holds as many layers)"
        if virtual > 1 and pipeline < 2:
            needs = "--pipeline >= 2" if cli else "parallel.pipeline >= 2"
            return (f"{key('virtual_pipeline', virtual)} needs {needs} (the interleaved schedule interleaves "
                    "chunks of several stages)")
        return None
