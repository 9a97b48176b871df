"""Training plan of a decoder on N GPUs: parameters, memory per GPU, FLOPs, step time (`omni model plan`).

Pure arithmetic over dataclasses; the only model code used is :func:`omni.model.flops_per_token` and
:func:`omni.model.count_parameters`. Every formula names its source next to it. The layout is
megatron-core's (the backend parallel/megatron/ builds): tensor (TP), pipeline (PP, 1F1B, interleaved
with V > 1), context (CP) and data parallelism (DP = gpus / (TP x PP x CP)), bf16 weights with fp32
main gradients and an fp32 Adam state (Megatron-LM's mixed precision).

Sources:

- [MLM-DO] Megatron-LM, docs/user-guide/features/dist_optimizer.md (the former README section "Distributed
  Optimizer"): bytes per parameter for bf16 parameters with fp32 gradients: 18 without the distributed
  optimizer, 6 + 12/d with it (d = data-parallel size).
- [MLM-MEM] Megatron-LM, megatron/training/theoretical_memory_usage.py: most loaded shard (the first
  stage holds the embedding; with PP = 1 an untied output layer too), in-flight micro-batches, the
  interleaved-schedule memory factor 1 + (p-1)/(p v).
- [K22] Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  arXiv:2205.05198, Table 2 (activation bytes per transformer layer) and section 4.2.3 (the first
  1F1B stage holds p micro-batches of activations).
- [N21] Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM", arXiv:2104.04473, section 2.2: pipeline bubble (p-1)/m for 1F1B, (p-1)/(v m) for the
  interleaved schedule.
- [FA2] Dao 2023, "FlashAttention-2", arXiv:2307.08691: the backward recomputes the attention matrix
  from Q, K, V, the output and the softmax log-sum-exp, so nothing of size s^2 is stored.
- GPU datasheets (dense figures: NVIDIA lists Hopper/Blackwell tensor FLOP/s "with sparsity", twice
  the dense ones): see :data:`GPUS`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from omni.config.model import ModelConfig
from omni.errors import ConfigError

GIB = 2**30

BYTES_WEIGHT = 2
"""bf16 model weights (megatron-core's params_dtype=bf16) [MLM-DO]."""
BYTES_GRAD = 4
"""fp32 main gradients in megatron's DDP grad buffer (accumulate_allreduce_grads_in_fp32) [MLM-DO]."""
BYTES_OPTIMIZER = 12
"""Adam in fp32: master weight + first and second moment, 4 + 4 + 4 [MLM-DO]."""
BYTES_FP8_WEIGHT_COPIES = 2
"""precision=fp8: Transformer Engine casts each block linear's weight to FP8 once per step and keeps
the row-wise and the column-wise (transposed) copy, 1 + 1 B, until the step ends (an estimate)."""
BYTES_LOGIT = 6
"""Per logit on the last stage: the bf16 output of the output layer (2 B) is alive while megatron's
vocab-parallel cross entropy makes its fp32 copy, which it keeps as exp(logits) for backward (4 B)
(megatron/core/tensor_parallel/cross_entropy.py)."""
BYTES_TOKEN_ID = 8
"""int64 token ids held by the embedding for backward, per in-flight micro-batch [MLM-MEM]."""
CUDA_OVERHEAD_GIB = 3.0
"""Fixed per-GPU memory outside the tensors counted here: CUDA context and kernels (~0.5-1 GiB),
NCCL communicator buffers for the DP/TP/PP/CP groups (~1 GiB), cuBLAS / Transformer Engine
workspaces (~0.5 GiB). An assumption, not a measurement."""
HEADROOM = 0.10
"""A layout fits when its total is at most (1 - HEADROOM) of the GPU's memory: room for allocator
fragmentation, transient buffers (sequence-parallel all-gathers, gradient buckets, the loss), and the
gap between a datasheet's GB and what the driver hands out."""
GPUS_PER_NODE = 8
"""Tensor parallelism stays inside one NVLink node of 8 GPUs ([N21] section 3, takeaway #1: TP up to the
GPUs of a server, then PP across servers)."""
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp8")


@dataclass(frozen=True)
class GPU:
    """One accelerator: memory and dense tensor-core peak."""

    name: str
    memory_gib: float
    """Datasheet memory, read as GiB (HBM stacks are binary sized; HEADROOM covers what is reserved)."""
    bf16_flops: float
    """Dense BF16 tensor-core FLOP/s."""
    fp8_flops: float | None
    """Dense FP8 tensor-core FLOP/s (None: no FP8 tensor cores)."""
    source: str

    def peak(self, precision: str) -> float:
        if precision == "fp8":
            if self.fp8_flops is None:
                raise ConfigError(f"--precision fp8 needs FP8 tensor cores; the {self.name} has none (use bf16)")
            return self.fp8_flops
        return self.bf16_flops


GPUS: dict[str, GPU] = {
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100/): BF16 tensor core 312 TFLOPS dense
    # (624 with sparsity), 80 GB HBM2e (SXM; a 40 GB part exists too); Ampere has no FP8.
    "a100": GPU("A100 SXM 80GB", 80, 312e12, None, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense, 80 GB"),
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100/), SXM: BF16 1,979 and FP8 3,958 TFLOPS
    # "with sparsity; specifications 1/2 lower without sparsity" -> 989 / 1,979 dense; 80 GB HBM3.
    "h100": GPU("H100 SXM", 80, 989e12, 1979e12, "NVIDIA H100 datasheet (SXM): BF16 1,979 / FP8 3,958 TFLOPS "
                "with sparsity, half dense; 80 GB"),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200/), SXM: the H100's compute (BF16 1,979,
    # FP8 3,958 TFLOPS with sparsity) with 141 GB HBM3e.
    "h200": GPU("H200 SXM", 141, 989e12, 1979e12, "NVIDIA H200 datasheet (SXM): BF16 1,979 / FP8 3,958 TFLOPS "
                "with sparsity, half dense; 141 GB"),
    # NVIDIA HGX B200 specifications (nvidia.com/en-us/data-center/hgx/), per GPU: FP16/BF16 4.5 PFLOPS
    # and FP8 9 PFLOPS with sparsity -> 2.25 / 4.5 dense; 180 GB HBM3e (the 192 GB of early
    # announcements is the raw HBM; HGX B200 exposes 180 GB, 1.4 TB per 8 GPUs).
    "b200": GPU("B200 (HGX)", 180, 2250e12, 4500e12, "NVIDIA HGX B200 specifications: BF16 4.5 / FP8 9 PFLOPS "
                "with sparsity, half dense; 180 GB"),
}


def get_gpu(name: str) -> GPU:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown GPU {name!r}: expected one of {', '.join(GPUS)}") from None


@dataclass(frozen=True)
class Layout:
    """A megatron-core parallel layout (ParallelConfig's tensor/pipeline/virtual_pipeline/context)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    virtual_pipeline: int = 1
    sequence_parallel: bool | None = None
    """None: on whenever tensor > 1 (Korthikanti et al. 2022; megatron's recommended setting)."""

    @property
    def sp(self) -> bool:
        return self.tensor > 1 if self.sequence_parallel is None else bool(self.sequence_parallel and self.tensor > 1)

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context

    def data_parallel(self, gpus: int) -> int:
        return gpus // self.model_parallel

    def describe(self) -> str:
        s = f"TP={self.tensor} PP={self.pipeline}"
        if self.virtual_pipeline > 1:
            s += f" VP={self.virtual_pipeline}"
        if self.context > 1:
            s += f" CP={self.context}"
        return s


@dataclass(frozen=True)
class Training:
    """What a step does: batch, sequence, recompute, precision, optimizer sharding, assumed MFU."""

    seq_len: int
    micro_batch: int = 1
    global_batch: int | None = None
    """Sequences per optimizer step; None: about 2^20 tokens, a multiple of DP x micro_batch."""
    recompute: str = "none"
    precision: str = "bf16"
    distributed_optimizer: bool = True
    mfu: float = 0.40

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ConfigError(f"--seq-len must be >= 1, got {self.seq_len}")
        if self.micro_batch < 1:
            raise ConfigError(f"--micro-batch must be >= 1, got {self.micro_batch}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ConfigError(f"--global-batch must be >= 1, got {self.global_batch}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"--recompute {self.recompute!r}: expected one of {', '.join(RECOMPUTE)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {self.mfu}")


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def check_layout(cfg: ModelConfig, layout: Layout, gpus: int, seq_len: int) -> None:
    """Raise ConfigError (one line) for a layout megatron-core cannot build on ``gpus`` GPUs
    (the same rules as parallel/megatron/config.py's check_megatron)."""
    t, p, c, v = layout.tensor, layout.pipeline, layout.context, layout.virtual_pipeline
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if c < 1:
        raise ConfigError(f"--context must be >= 1, got {c}")
    problem = cfg.split_problem(t, p, v, cli=True)
    if problem:
        raise ConfigError(problem)
    if c > 1 and seq_len % (2 * c):
        raise ConfigError(f"--context {c} needs --seq-len {seq_len} to be a multiple of 2 x context = {2 * c}")
    if layout.sp and seq_len % t:
        raise ConfigError(f"sequence parallelism needs --seq-len {seq_len} to be a multiple of --tensor {t}")
    if gpus % layout.model_parallel:
        raise ConfigError(f"--gpus {gpus} is not a multiple of tensor x pipeline x context = {t} x {p} x {c} "
                          f"= {layout.model_parallel}")


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameters:
    total: int
    """All parameters (omni.model.count_parameters)."""
    embedding: int
    """The token embedding, V x D."""
    output: int
    """The untied output layer, V x D (0 when tied)."""
    per_layer: int
    """One transformer block."""
    per_layer_sharded: int
    """Of a block, the weights split over TP ranks (the linears); the rest (norms) is replicated."""
    first_stage: int
    """Pipeline stage 0: the embedding and n_layers/PP blocks (with PP = 1, everything)."""
    last_stage: int
    """The last stage: n_layers/PP blocks, the final norm and the output layer (a copy of the tied
    embedding when PP > 1, as megatron keeps one for its all-reduce)."""
    first_rank: float
    """Parameters one GPU of the first stage holds (linears and vocab / TP)."""
    last_rank: float
    """Parameters one GPU of the last stage holds."""


def parameters(cfg: ModelConfig, layout: Layout) -> Parameters:
    """Parameters in total and per pipeline stage and GPU [MLM-MEM: compute_weight_and_optimizer_memory]."""
    from omni.model import count_parameters

    c = cfg
    d = c.head_dim
    total = count_parameters(c)
    emb = c.vocab_size * c.dim
    out = 0 if c.tie_embeddings else emb
    linears = c.dim * c.n_heads * d * 2 + c.dim * c.n_kv_heads * d * 2 + 3 * c.dim * c.ffn_dim
    per_layer = (total - emb - out - c.dim) // c.n_layers
    t, p = layout.tensor, layout.pipeline
    lp = c.n_layers // p
    stage_layers = lp * per_layer
    rank_layers = lp * (linears / t + (per_layer - linears))
    if p == 1:
        first = last = total
        first_rank = last_rank = rank_layers + (emb + out) / t + c.dim
    else:
        first = emb + stage_layers
        head = out if out else emb  # tied: the last stage keeps a copy of the embedding
        last = stage_layers + c.dim + head
        first_rank = rank_layers + emb / t
        last_rank = rank_layers + c.dim + head / t
    return Parameters(total, emb, out, per_layer, linears, first, last, first_rank, last_rank)


def bytes_per_parameter(distributed_optimizer: bool, data_parallel: int) -> float:
    """Weights + gradients + Adam state per parameter, bf16 params with fp32 grads [MLM-DO]:
    18 without the distributed optimizer, 6 + 12/d with it (2 bf16 weight + 4 fp32 main grad
    + 12 fp32 master weight and moments, sharded over the d data-parallel ranks)."""
    opt = BYTES_OPTIMIZER / data_parallel if distributed_optimizer else BYTES_OPTIMIZER
    return BYTES_WEIGHT + BYTES_GRAD + opt


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                            recompute: str = "none") -> float:
    """Activation bytes of one GPT-3-style transformer layer (LayerNorm, GeLU MLP of 4h, dropout,
    attention without flash), 16-bit activations: Korthikanti et al. 2022 [K22], Table 2.

    - no parallelism:                          sbh (34 + 5as/h)
    - tensor parallel:                         sbh (10 + 24/t + 5as/(ht))
    - tensor + sequence parallel:              sbh (34/t + 5as/(ht))
    - tensor parallel + selective recompute:   sbh (10 + 24/t)
    - tensor + sequence + selective recompute: sbh (34/t)
    - full recompute:                          sbh (2)   (the layer input only)
    """
    sbh = s * b * h
    attn = 5 * a * s / h  # softmax output (2), its dropout mask (1) and dropout output (2): 5as^2b bytes
    if recompute == "full":
        return 2 * sbh
    quad = 0.0 if recompute == "selective" else attn / t
    if sequence_parallel and t > 1:
        return sbh * (34 / t + quad)
    return sbh * (10 + 24 / t + quad)


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one transformer block keeps for backward per token, on one GPU (omni's block)."""

    replicated: float
    """Tensors every TP rank holds in full without sequence parallelism (norm inputs, inputs of the
    column-parallel linears): omni's counterpart of the '10' of [K22] Table 2 (8h: no dropout masks)."""
    sharded: float
    """Tensors split over TP ranks (per-head and FFN-column tensors): the counterpart of the '24'."""
    attention_stats: float
    """FlashAttention's softmax log-sum-exp, fp32 per head (what selective recompute drops)."""


def layer_activation_terms(cfg: ModelConfig) -> LayerActivations:
    """[K22]'s per-layer count adapted to omni's block (omni/model.py), bytes per token, no parallelism.

    Assumptions (each a departure from [K22]'s GPT-3 layer):
    - FlashAttention / cuDNN fused attention [FA2]: Q, K, V (after QK-norm and RoPE), the output O and
      the softmax log-sum-exp (4 B x heads) are saved; the s x s scores, softmax and its dropout mask
      (the 5as/h term) are never stored.
    - No dropout masks unless ``dropout > 0`` (omni's recipes: 0); attention dropout inside flash
      attention keeps only its RNG state.
    - RMSNorm (pre-norm): its input is saved, 2h, twice per layer (LayerNorm in [K22] also saves 2h).
    - GQA: K and V are K*d wide, not h.
    - QK-norm (Chameleon; LayerNorm over head_dim) saves its inputs: the q and k projections.
    - SwiGLU, unfused as omni and its megatron backend run it (bias_activation_fusion off): the fc1
      output [gate | up] (4F), silu(gate) (2F) and the fc2 input silu(gate) * up (2F) = 8F.

    This is the megatron-core / Transformer Engine block (norms fused into the next linear, which
    saves the norm input and output once). The plain-PyTorch block of omni/model.py keeps more: fp32
    copies of the RMSNorm and QK-norm inputs (its norms compute in fp32) and a second copy of the
    attention output (the reshape before wo); counted with saved_tensors_hooks on a dim-512 bf16 block
    it holds about 1.4x this.
    """
    h, F = cfg.dim, cfg.ffn_dim
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    # [K22] section 4.1: inputs of the column-parallel linears and of the norms stay whole on every
    # TP rank unless sequence parallelism shards them.
    replicated = (2 * h      # attention RMSNorm input
                  + 2 * h    # QKV linear input (the norm output)
                  + 2 * h    # MLP RMSNorm input
                  + 2 * h)   # fc1 input (the norm output)
    if cfg.dropout > 0:
        replicated += 2 * h  # [K22]: the two residual-branch dropout masks, 1 B per element each
    sharded = 0.0
    if cfg.qk_norm != "none":
        sharded += 2 * q + 2 * kv          # QK-norm inputs: q and k projections
    sharded += 2 * q + 2 * kv + 2 * kv     # flash attention: Q, K, V
    sharded += 2 * q                       # attention output O = input of the output projection
    sharded += 4 * F + 2 * F + 2 * F       # SwiGLU: fc1 output, silu(gate), fc2 input
    stats = 4 * cfg.n_heads                # flash: fp32 log-sum-exp per head
    return LayerActivations(replicated, sharded, stats)


def layer_activation_bytes(cfg: ModelConfig, tokens: int, tensor: int = 1, sequence_parallel: bool = False,
                           recompute: str = "none") -> float:
    """Bytes one block keeps on one GPU for ``tokens`` tokens (s*b/CP of a micro-batch) [K22 Table 2,
    adapted by :func:`layer_activation_terms`].

    - none:      tokens * (r + (s + a)/t) without SP, tokens * (r + s + a)/t with SP.
    - selective: [K22]'s recompute of the attention core; with FlashAttention only its statistics
      (a) were held beyond Q, K, V and O, so it saves a: megatron-core's recompute_modules=["core_attn"].
    - full:      the block input only, 2h per token [K22 Table 2], /t with SP (the input between
      blocks is sequence-sharded).
    """
    if recompute == "full":
        return tokens * 2 * cfg.dim / (tensor if sequence_parallel else 1)
    a = layer_activation_terms(cfg)
    stats = 0.0 if recompute == "selective" else a.attention_stats
    if sequence_parallel:
        return tokens * (a.replicated + a.sharded + stats) / tensor
    return tokens * (a.replicated + (a.sharded + stats) / tensor)


def in_flight_microbatches(pipeline: int, virtual: int, microbatches: int) -> float:
    """Micro-batches of activations the first pipeline stage holds at its peak.

    1F1B: the first stage runs p forwards before its first backward, so it holds min(m, p) [K22
    section 4.2.3; N21 section 2.2.1]. Interleaved (v > 1): p (1 + (p-1)/(p v)) [MLM-MEM].
    """
    if pipeline == 1:
        return 1.0
    if virtual > 1:
        return pipeline * (1 + (pipeline - 1) / (pipeline * virtual))
    return float(min(microbatches, pipeline))


def pipeline_bubble(pipeline: int, virtual: int, microbatches: int) -> float:
    """Idle time over compute time of a pipeline step: (p-1)/m for 1F1B, (p-1)/(v m) interleaved
    [N21 sections 2.2.1, 2.2.2]."""
    return (pipeline - 1) / (virtual * microbatches)


# ----------------------------------------------------------------------------------------------
# Memory, FLOPs, the plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU of a pipeline stage."""

    stage: str
    parameters: float
    weights: float
    fp8_weight_copies: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    activation_blocks: float = 0.0
    """Of ``activations``: the transformer blocks (layers x per-layer bytes x in-flight micro-batches)."""

    @property
    def total(self) -> float:
        return (self.weights + self.fp8_weight_copies + self.gradients + self.optimizer + self.activations
                + self.overhead)


@dataclass
class Plan:
    gpus: int
    gpu: GPU
    layout: Layout
    training: Training
    data_parallel: int
    global_batch: int
    microbatches: int
    """Micro-batches per step and data-parallel rank (grad accumulation steps): m of the bubble."""
    params: Parameters
    layer_bytes: dict[str, float]
    """One block's activation bytes per micro-batch on one GPU, for each recompute mode."""
    in_flight: float
    memory: list[Memory]
    flops_per_token: float
    flops_per_step: float
    bubble: float
    step_seconds: float
    tokens_per_second: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Memory:
        return max(self.memory, key=lambda m: m.total)

    @property
    def budget_gib(self) -> float:
        return self.gpu.memory_gib * (1 - HEADROOM)

    @property
    def fits(self) -> bool:
        return self.peak.total / GIB <= self.budget_gib

    def to_dict(self) -> dict:
        g = lambda x: round(x / GIB, 3)  # noqa: E731
        return {
            "gpus": self.gpus,
            "gpu": asdict(self.gpu),
            "layout": {"tensor": self.layout.tensor, "pipeline": self.layout.pipeline,
                       "virtual_pipeline": self.layout.virtual_pipeline, "context": self.layout.context,
                       "sequence_parallel": self.layout.sp, "data_parallel": self.data_parallel},
            "training": {**asdict(self.training), "global_batch": self.global_batch,
                         "microbatches_per_step": self.microbatches},
            "parameters": asdict(self.params),
            "activations_per_layer_gib": {k: g(v) for k, v in self.layer_bytes.items()},
            "in_flight_microbatches": self.in_flight,
            "memory_gib": [{"stage": m.stage, "parameters": m.parameters, "weights": g(m.weights),
                            "fp8_weight_copies": g(m.fp8_weight_copies), "gradients": g(m.gradients),
                            "optimizer": g(m.optimizer), "activations": g(m.activations),
                            "activations_blocks": g(m.activation_blocks),
                            "overhead": g(m.overhead), "total": g(m.total)} for m in self.memory],
            "gpu_memory_gib": self.gpu.memory_gib,
            "budget_gib": round(self.budget_gib, 3),
            "fits": self.fits,
            "flops_per_token": self.flops_per_token,
            "flops_per_step": self.flops_per_step,
            "pipeline_bubble": self.bubble,
            "step_seconds": self.step_seconds,
            "tokens_per_second": self.tokens_per_second,
            "tokens_per_second_per_gpu": self.tokens_per_second / self.gpus,
            "notes": self.notes,
        }


def default_global_batch(seq_len: int, data_parallel: int, micro_batch: int) -> int:
    """About 2^20 tokens per step, rounded up to a multiple of DP x micro_batch (at least one each)."""
    unit = data_parallel * micro_batch
    want = max(1, round(2**20 / seq_len))
    return max(unit, math.ceil(want / unit) * unit)


def step_time(flops_per_step: float, gpus: int, peak_flops: float, mfu: float, bubble: float = 0.0) -> float:
    """Seconds per step: model FLOPs / (gpus x peak x MFU), stretched by the pipeline bubble.

    ``mfu`` is the model-FLOPs utilization of the busy time (the MFU of the same run without a
    pipeline); the end-to-end MFU is mfu / (1 + bubble) [N21 section 2.2]. Model FLOPs do not count
    recomputation (Chowdhery et al. 2022, PaLM, appendix B: MFU vs hardware FLOPs utilization)."""
    return flops_per_step / (gpus * peak_flops * mfu) * (1 + bubble)


def make_plan(cfg: ModelConfig, gpus: int, gpu: GPU, layout: Layout, training: Training) -> Plan:
    """The plan of one layout (checked first: ConfigError when megatron-core cannot build it)."""
    from omni.model import flops_per_token

    tr = training
    check_layout(cfg, layout, gpus, tr.seq_len)
    peak_flops = gpu.peak(tr.precision)
    t, p, cp, v = layout.tensor, layout.pipeline, layout.context, layout.virtual_pipeline
    dp = layout.data_parallel(gpus)
    gb = tr.global_batch if tr.global_batch is not None else default_global_batch(tr.seq_len, dp, tr.micro_batch)
    if gb % (dp * tr.micro_batch):
        raise ConfigError(f"--global-batch {gb} is not a multiple of data-parallel size x micro-batch = "
                          f"{dp} x {tr.micro_batch} = {dp * tr.micro_batch}")
    m = gb // (dp * tr.micro_batch)
    notes: list[str] = []
    if v > 1 and m % p:
        notes.append(f"the interleaved schedule wants micro-batches per step ({m}) to be a multiple of "
                     f"--pipeline {p}")

    params = parameters(cfg, layout)
    tokens = tr.seq_len * tr.micro_batch // cp  # tokens of one micro-batch on one GPU
    layer_bytes = {r: layer_activation_bytes(cfg, tokens, t, layout.sp, r) for r in RECOMPUTE}
    per_layer = layer_bytes[tr.recompute]
    layers_per_stage = cfg.n_layers // p
    in_flight = in_flight_microbatches(p, v, m)
    # Last stage: final-norm input (2h), output-layer input (2h, sequence-sharded with SP), logits
    # (vocab-sharded over TP): one micro-batch (1F1B runs its backward right after its forward).
    sp_div = t if layout.sp else 1
    head_act = tokens * (2 * cfg.dim / sp_div + 2 * cfg.dim / sp_div + BYTES_LOGIT * cfg.vocab_size / t)
    ids = tokens * BYTES_TOKEN_ID

    d_opt = dp * cp  # megatron shards the optimizer over the data-parallel group with context ranks
    fp8_lin = BYTES_FP8_WEIGHT_COPIES * layers_per_stage * params.per_layer_sharded / t if tr.precision == "fp8" else 0.0

    def stage_memory(name: str, n_params: float, blocks: float, other: float) -> Memory:
        opt = BYTES_OPTIMIZER / d_opt if tr.distributed_optimizer else BYTES_OPTIMIZER
        return Memory(name, n_params, n_params * BYTES_WEIGHT, fp8_lin, n_params * BYTES_GRAD, n_params * opt,
                      blocks + other, CUDA_OVERHEAD_GIB * GIB, blocks)

    first_blocks = layers_per_stage * per_layer * in_flight
    if p == 1:
        memory = [stage_memory("single", params.first_rank, first_blocks, ids + head_act)]
    else:
        # The last stage holds one micro-batch in flight (1F1B), so its block activations are 1/p of
        # the first stage's: it is the peak only when the output layer and logits outweigh that.
        last_inflight = 1.0 + ((p - 1) / (p * v) if v > 1 else 0.0)
        memory = [stage_memory("first", params.first_rank, first_blocks, ids * in_flight),
                  stage_memory("last", params.last_rank, layers_per_stage * per_layer * last_inflight, head_act)]

    fpt = flops_per_token(cfg, tr.seq_len)
    tokens_step = gb * tr.seq_len
    fps = fpt * tokens_step
    bubble = pipeline_bubble(p, v, m) if p > 1 else 0.0
    secs = step_time(fps, gpus, peak_flops, tr.mfu, bubble)
    if t > GPUS_PER_NODE:
        notes.append(f"--tensor {t} spans more than one node of {GPUS_PER_NODE} GPUs: its all-reduces leave NVLink")
    if cfg.swin_norm:
        notes.append("swin_norm=true is not built for parallel.backend=megatron yet (parallel/megatron/config.py)")
    if tr.precision == "fp8":
        notes.append("fp8: MFU is taken against the FP8 peak although the embedding, output layer and "
                     "attention stay bf16; activations are counted in bf16 (an over-estimate)")
    return Plan(gpus, gpu, layout, tr, dp, gb, m, params, layer_bytes, in_flight, memory, fpt, fps, bubble, secs,
                tokens_step / secs, notes)


def candidate_layouts(cfg: ModelConfig, gpus: int, context: int = 1, virtual: int = 1) -> list[Layout]:
    """Layouts in the order they are tried: TP = 1, 2, 4, 8 (those the model splits over,
    ModelConfig.split_problem, inside a node of 8), then, at the largest of those TPs, PP over the
    divisors of n_layers [N21 section 3, takeaway #1: tensor parallelism within a node, pipeline
    across nodes]. Each divides ``gpus`` with ``context``; :func:`make_plan` checks the rest."""
    tps = [t for t in (1, 2, 4, 8)
           if t <= min(gpus, GPUS_PER_NODE) and cfg.split_problem(t, 1) is None and gpus % (t * context) == 0]
    out = [Layout(t, 1, context) for t in tps]
    tmax = tps[-1] if tps else 1
    for p in range(2, cfg.n_layers + 1):
        if cfg.n_layers % (p * virtual) == 0 and gpus % (tmax * p * context) == 0:
            out.append(Layout(tmax, p, context, virtual))
    return out


@dataclass
class Suggestion:
    plan: Plan | None
    """The first layout that fits (None: none does)."""
    tried: list[Plan]
    """Every layout tried, in order."""
    reason: str
    full_recompute: Plan | None = None
    """When nothing fits and recompute was not full: the first layout that fits with full recompute."""


def suggest(cfg: ModelConfig, gpus: int, gpu: GPU, training: Training, context: int = 1,
            virtual: int = 1) -> Suggestion:
    """The smallest model-parallel layout that fits (see :func:`candidate_layouts` for the order)."""
    tried: list[Plan] = []
    skipped: list[str] = []
    for lay in candidate_layouts(cfg, gpus, context, virtual):
        try:
            pl = make_plan(cfg, gpus, gpu, lay, training)
        except ConfigError as e:
            skipped.append(f"{lay.describe()} skipped ({e})")
            continue
        tried.append(pl)
        if pl.fits:
            smaller = [f"{q.layout.describe()} needs {q.peak.total / GIB:.1f} GiB" for q in tried[:-1]]
            why = (f"{lay.describe()} is the smallest model-parallel layout whose peak ({pl.peak.total / GIB:.1f} GiB, "
                   f"{pl.peak.stage} stage) fits {pl.budget_gib:.1f} GiB ({1 - HEADROOM:.0%} of {gpu.memory_gib:g})")
            if smaller or skipped:
                why += "; " + "; ".join(smaller + skipped)
            if lay.tensor == 1 and lay.pipeline == 1:
                why += ("; one GPU holds the whole model" if gpus == 1
                        else "; no model parallelism needed: every GPU is a data-parallel rank")
            return Suggestion(pl, tried, why)
    if not tried:
        raise ConfigError(f"no layout of {cfg.n_layers} layers and {cfg.n_heads} heads can run on --gpus {gpus}: "
                          + "; ".join(skipped or ["no tensor x pipeline x context size divides it"]))
    last = tried[-1]
    why = (f"no layout fits: the largest tried, {last.layout.describe()}, needs {last.peak.total / GIB:.1f} GiB on its "
           f"{last.peak.stage} stage against {last.budget_gib:.1f} GiB usable of {gpu.memory_gib:g}")
    alt = None
    if training.recompute != "full":
        alt = suggest(cfg, gpus, gpu, replace(training, recompute="full"), context, virtual).plan
        why += (f"; with --recompute full, {alt.layout.describe()} fits ({alt.peak.total / GIB:.1f} GiB)" if alt
                else "; not even with --recompute full")
    why += "; more GPUs shard the optimizer further (distributed optimizer) and allow a larger TP x PP"
    return Suggestion(None, tried, why, alt)


__all__ = [
    "GPU", "GPUS", "Layout", "Training", "Parameters", "LayerActivations", "Memory", "Plan", "Suggestion",
    "get_gpu", "check_layout", "parameters", "bytes_per_parameter", "korthikanti_layer_bytes",
    "layer_activation_terms", "layer_activation_bytes", "in_flight_microbatches", "pipeline_bubble",
    "default_global_batch", "step_time", "make_plan", "candidate_layouts", "suggest",
]
