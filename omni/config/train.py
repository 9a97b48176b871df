"""Training configs: the optimization loop (:class:`TrainConfig`) and how it is spread over processes."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import check, check_choice


@dataclass
class LossWeights:
    """Weight of each target token's loss by its modality (special tokens count as text)."""

    text: float = 1.0
    """Weight of text (and special) targets."""
    image: float = 1.0
    """Weight of image-code targets."""
    audio: float = 1.0
    """Weight of audio-code targets."""
    det: float = 1.0
    """Weight of the detection head's loss (its weighted DETR terms; ``heads.det.enabled``), added to
    the LM loss; it is a mean over the global batch's ``<det>`` routes."""
    gen: float = 1.0
    """Weight of the diffusion head's loss (``heads.gen.enabled``), added to the LM loss; a mean over
    the global batch's ``<gen>`` routes."""

    def __post_init__(self) -> None:
        for name in ("text", "image", "audio", "det", "gen"):
            v = getattr(self, name)
            check(v >= 0, name, v, ">= 0")


@dataclass
class WandbConfig:
    """Weights & Biases logging, next to metrics.jsonl and TensorBoard (the optional `wandb` extra)."""

    enabled: bool = False
    """Log every metrics row to a W&B run (rank 0 only)."""
    project: str = "omni"
    """W&B project name."""
    entity: str = ""
    """W&B team or user ('' = the account's default)."""
    mode: str = "offline"
    """'offline' (written under OUT/wandb, sync later with `wandb sync`; needs no network) or 'online'."""

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", ("offline", "online"))


@dataclass
class Fp8Config:
    """FP8 training through Transformer Engine (train.precision=fp8, parallel.backend=megatron).

    megatron-core builds the TE recipe from these (its ``fp8_utils.get_fp8_recipe``) and runs each
    transformer layer under TE's FP8 autocast; embeddings, the output layer and the loss stay in bf16.
    """

    recipe: str = "tensorwise"
    """'delayed' (per-tensor scales from an amax history, FP8-LM / TE's DelayedScaling), 'tensorwise'
    (current scaling: the scale of this step's amax), 'blockwise' (128-wide blocks; Hopper) or 'mxfp8'
    (32-element microscaling blocks; Blackwell only)."""
    format: str = "hybrid"
    """'hybrid' (E4M3 forward, E5M2 gradients) or 'e4m3' (both)."""
    amax_history_len: int = 1024
    """Steps of amax history kept per tensor ('delayed' only)."""
    amax_compute_algo: str = "max"
    """How the scale reads the history: 'max' over it or 'most_recent' ('delayed' only)."""
    margin: int = 0
    """Scale down by 2**margin for headroom ('delayed' only)."""
    first_last_layers_bf16: bool = False
    """Keep the first and the last transformer layer in bf16 (not with 'delayed')."""
    fp8_params: bool = False
    """Keep the GEMM weights themselves in FP8 (less memory; the optimizer keeps an fp32 master copy)."""

    def __post_init__(self) -> None:
        check_choice(self.recipe, "recipe", ("delayed", "tensorwise", "blockwise", "mxfp8"))
        check_choice(self.format, "format", ("hybrid", "e4m3"))
        check(self.amax_history_len >= 1, "amax_history_len", self.amax_history_len, ">= 1")
        check_choice(self.amax_compute_algo, "amax_compute_algo", ("max", "most_recent"))
        check(self.margin >= 0, "margin", self.margin, ">= 0")
        check(not (self.first_last_layers_bf16 and self.recipe == "delayed"), "first_last_layers_bf16",
              self.first_last_layers_bf16, "false with recipe='delayed' (delayed scaling cannot leave layers out)")


@dataclass
class DPOConfig:
    """Preference tuning (train.stage=dpo): sigmoid DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7)
    against a frozen reference, the weights of train.init_from (omni.train.dpo)."""

    beta: float = 0.1
    """Temperature of the implicit reward beta * (log pi - log ref); DPO's usual 0.1."""
    sft_weight: float = 0.0
    """Weight of an added SFT term: the chosen responses' negative log-likelihood per token (RPO,
    Pang et al. 2024, arXiv 2404.19733); 0 = plain DPO."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", self.beta, "> 0 (0.1 is the usual choice)")
        check(self.sft_weight >= 0, "sft_weight", self.sft_weight, ">= 0")


@dataclass
class TrainConfig:
    """The training loop: stage, optimizer, schedule, precision, checkpoints and logging."""

    out: str = "runs/omni"
    """Run folder: checkpoints (step_*/), metrics.jsonl, tensorboard/."""
    stage: str = "pretrain"
    """'pretrain' (loss on every token), 'sft' (no loss on prompt segments) or 'dpo' (preference pairs of
    `omni data preprocess`, sigmoid DPO against the train.init_from weights: train.dpo)."""
    steps: int = 1000
    """Optimizer steps to train."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; global batch = micro_batch_size * grad_accum * world."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr."""
    schedule: str = "cosine"
    """After warmup: 'cosine' decay to min_lr, 'wsd' (warmup-stable-decay: constant, then linear decay over the last decay_fraction of steps) or 'constant'."""
    decay_fraction: float = 0.2
    """Share of steps in the decay phase of 'wsd'."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    precision: str = "fp32"
    """'fp32'; 'bf16' (autocast on the torch backend, bf16 weights with fp32 master weights in the
    optimizer on the megatron backend); 'fp8' (Transformer Engine, megatron backend, train.fp8)."""
    fp8: Fp8Config = field(default_factory=Fp8Config)
    """FP8 settings, used when precision='fp8'."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    loss_weights: LossWeights = field(default_factory=LossWeights)
    """Per-modality weights of the loss."""
    max_bad_steps: int = 5
    """Abort after this many non-finite losses or gradients in a row (each one skips its step)."""
    save_every: int = 500
    """Save a checkpoint every this many steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Keep this many newest checkpoints; older ones are deleted."""
    log_every: int = 10
    """Write metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files to OUT/tensorboard."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device, for the MFU estimate (0: MFU not reported)."""
    eval_every: int = 0
    """Measure the validation loss on data.eval_paths every this many steps and at the end (0: never)."""
    eval_batches: int = 4
    """Micro-batches per process in one validation (the same sequences every time, so the figures compare)."""
    init_from: str = ""
    """Start from this checkpoint's weights (a checkpoint folder or a run folder, whose newest intact
    step is taken) with a fresh optimizer, schedule and data stream at step 0: fine-tuning. Once the
    run has checkpoints of its own, --resume auto continues from those instead."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Optional Weights & Biases logging."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO settings, used when stage='dpo'."""

    def __post_init__(self) -> None:
        check_choice(self.stage, "stage", ("pretrain", "sft", "dpo"))
        check_choice(self.schedule, "schedule", ("cosine", "wsd", "constant"))
        check_choice(self.precision, "precision", ("fp32", "bf16", "fp8"))
        check(self.steps >= 1, "steps", self.steps, ">= 1")
        check(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, ">= 1")
        check(self.grad_accum >= 1, "grad_accum", self.grad_accum, ">= 1")
        check(self.lr > 0, "lr", self.lr, "> 0")
        check(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"in [0, lr={self.lr}]")
        check(0 <= self.warmup_steps <= self.steps, "warmup_steps", self.warmup_steps, f"in [0, steps={self.steps}]")
        check(0 < self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "in (0, 1]")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(0 <= self.beta1 < 1, "beta1", self.beta1, "in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", self.beta2, "in [0, 1)")
        check(self.eps > 0, "eps", self.eps, "> 0")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0")
        check(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, ">= 1")
        check(self.save_every >= 1, "save_every", self.save_every, ">= 1")
        check(self.keep_last >= 1, "keep_last", self.keep_last, ">= 1")
        check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        check(self.peak_flops >= 0, "peak_flops", self.peak_flops, ">= 0")
        check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0 (0: no validation)")
        check(self.eval_batches >= 1, "eval_batches", self.eval_batches, ">= 1")


@dataclass
class ParallelConfig:
    """How training is spread over the processes torchrun starts.

    backend 'torch': the plain-PyTorch decoder, data parallel only (DDP or FSDP2). backend 'megatron':
    the same decoder built on megatron-core (parallel/megatron/), with tensor, pipeline and context
    parallelism; the data-parallel size is what is left: world / (tensor x pipeline x context).
    """

    backend: str = "torch"
    """'torch' (plain PyTorch: DDP / FSDP2) or 'megatron' (megatron-core: TP / PP / CP, FP8 with TE)."""
    strategy: str = "ddp"
    """backend=torch, more than one process: 'ddp' (replicated weights) or 'fsdp' (FSDP2 fully_shard)."""
    dist_backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on GPU, gloo on CPU), 'gloo' or 'nccl'."""
    tensor: int = 1
    """backend=megatron: tensor-parallel size (Megatron-LM: heads and FFN columns split over ranks)."""
    pipeline: int = 1
    """backend=megatron: pipeline-parallel size (layers split into stages; 1F1B schedule)."""
    virtual_pipeline: int = 1
    """backend=megatron: model chunks per pipeline stage (the interleaved schedule when > 1)."""
    context: int = 1
    """backend=megatron: context-parallel size (the sequence split over ranks; needs Transformer Engine)."""
    sequence_parallel: bool = False
    """backend=megatron: shard norms and dropout over the sequence within a TP group (needs tensor > 1)."""
    distributed_optimizer: bool = False
    """backend=megatron: shard the optimizer state over data-parallel ranks (ZeRO-1)."""

    def __post_init__(self) -> None:
        check_choice(self.backend, "backend", ("torch", "megatron"))
        check_choice(self.strategy, "strategy", ("ddp", "fsdp"))
        check_choice(self.dist_backend, "dist_backend", ("auto", "gloo", "nccl"))
        for key in ("tensor", "pipeline", "virtual_pipeline", "context"):
            check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
