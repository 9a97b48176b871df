"""Checks and pure config mappings of the megatron-core backend; imports nothing of megatron-core.

:func:`check_megatron` refuses, before any process group starts, every parallel / precision layout
that megatron-core or Transformer Engine would reject later (or, worse, run wrongly): one
:class:`~omni.errors.ConfigError` naming the keys and why. What the machine has (Transformer Engine,
the GPU's compute capability) comes from :func:`probe`, passed in so the checks are pure and testable.

:func:`transformer_config_kwargs` maps omni's ModelConfig (+ precision) onto the keyword arguments of
megatron-core's ``TransformerConfig`` (0.16): GQA as ``num_query_groups``, RMSNorm, SwiGLU as
``gated_linear_unit`` with SiLU, no biases, RoPE base, init std (megatron's scaled init of the output
projections is omni's 1/sqrt(2 n_layers)); :func:`fp8_kwargs` its FP8 part.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omni.errors import ConfigError


@dataclass(frozen=True)
class Machine:
    """What the checks need to know of this machine."""

    te_version: str | None = None
    """transformer_engine's version, None when it does not import."""
    capability: tuple[int, int] | None = None
    """(major, minor) compute capability of GPU 0, None without CUDA."""


def probe() -> Machine:
    """This machine: Transformer Engine (found without importing it: an import loads CUDA libraries)
    and GPU 0's compute capability."""
    import importlib.metadata
    import importlib.util

    import torch

    te = None
    if importlib.util.find_spec("transformer_engine") is not None:
        try:
            te = importlib.metadata.version("transformer_engine")
        except importlib.metadata.PackageNotFoundError:
            te = "unknown"
    cap = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    return Machine(te, cap)


CPU_SHIM_ENV = "OMNI_MEGATRON_CPU_SHIM"
"""Set only by the tests' CPU shim (tests/megatron/shim.py), which redirects megatron-core's CUDA
calls to the CPU: then the megatron backend runs on gloo processes without a GPU."""


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def check_megatron(cfg, world: int | None = None, machine: Machine | None = None) -> None:
    """Refuse a RunConfig that the megatron backend cannot run as asked (ConfigError, one line naming
    the keys and why). ``world``: the number of processes (default: torchrun's WORLD_SIZE, else 1)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    mega = p.backend == "megatron"
    if not mega:
        used = [f"parallel.{k}={getattr(p, k)}" for k in ("tensor", "pipeline", "virtual_pipeline", "context")
                if getattr(p, k) != 1]
        used += [f"parallel.{k}=true" for k in ("sequence_parallel", "distributed_optimizer") if getattr(p, k)]
        if t.precision == "fp8":
            used.append("train.precision=fp8")
        if used:
            _fail(f"{', '.join(used)} need parallel.backend=megatron (the torch backend is data parallel "
                  "only, in fp32 or bf16)")
        return
    machine = machine or probe()
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if machine.capability is None and not os.environ.get(CPU_SHIM_ENV):
        _fail("parallel.backend=megatron needs CUDA GPUs: megatron-core allocates on the GPU even in its local "
              "layer spec (this machine has none); train here with parallel.backend=torch")
    problem = m.split_problem(p.tensor, p.pipeline, p.virtual_pipeline)
    if problem:
        _fail(problem)
    if m.swin_norm:
        _fail("model.swin_norm=true (Chameleon-34B's norm order) is not built for parallel.backend=megatron; "
              "train it with parallel.backend=torch")
    if m.rope.kind != "rope" or m.rope.scaling != "none":
        _fail(f"model.rope.kind={m.rope.kind!r} scaling={m.rope.scaling!r} is not wired into parallel.backend=megatron "
              "(it builds plain RoPE); train it with parallel.backend=torch")
    if p.sequence_parallel and p.tensor < 2:
        _fail("parallel.sequence_parallel=true needs parallel.tensor >= 2 (it shards the sequence within a "
              "tensor-parallel group)")
    if p.sequence_parallel and machine.te_version is None:
        _fail("parallel.sequence_parallel=true needs Transformer Engine's layers (pip install 'omni[gpu]'); "
              "megatron-core's local spec has no sequence-parallel norm")
    if p.context > 1 and machine.te_version is None:
        _fail(f"parallel.context={p.context} needs Transformer Engine (its attention splits the sequence; "
              "pip install 'omni[gpu]')")
    if p.context > 1 and cfg.data.seq_len % (2 * p.context):
        _fail(f"parallel.context={p.context} needs data.seq_len={cfg.data.seq_len} to be a multiple of "
              f"2 x context = {2 * p.context} (each rank takes two load-balanced chunks)")
    if p.sequence_parallel and cfg.data.seq_len % p.tensor:
        _fail(f"parallel.sequence_parallel=true needs data.seq_len={cfg.data.seq_len} to be a multiple of "
              f"parallel.tensor={p.tensor}")
    model_parallel = p.tensor * p.pipeline * p.context
    if world % model_parallel:
        _fail(f"{world} processes cannot hold parallel.tensor={p.tensor} x pipeline={p.pipeline} x context="
              f"{p.context} = {model_parallel}: the world size must be a multiple of it")
    if t.precision == "fp8":
        if machine.te_version is None:
            _fail("train.precision=fp8 needs Transformer Engine (pip install 'omni[gpu]', or the NGC image of "
                  "the Dockerfile)")
        if machine.capability is None or machine.capability < (8, 9):
            have = "no GPU" if machine.capability is None else f"compute capability {machine.capability[0]}.{machine.capability[1]}"
            _fail(f"train.precision=fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell); this "
                  f"machine has {have}")
        if t.fp8.recipe == "mxfp8" and machine.capability < (10, 0):
            _fail(f"train.fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0); this one is "
                  f"{machine.capability[0]}.{machine.capability[1]}: use tensorwise, delayed or blockwise")
        if t.fp8.recipe == "blockwise" and machine.capability >= (10, 0):
            _fail("train.fp8.recipe=blockwise is Hopper's block scaling; on Blackwell use mxfp8")


def fp8_kwargs(train) -> dict:
    """The FP8 part of megatron-core's TransformerConfig for ``train`` (a TrainConfig): empty unless
    ``train.precision == 'fp8'``. megatron-core turns these into TE's recipe object
    (DelayedScaling, Float8CurrentScaling, Float8BlockScaling, MXFP8BlockScaling) and wraps each
    layer in TE's FP8 autocast."""
    if train.precision != "fp8":
        return {}
    f = train.fp8
    out = {"fp8": f.format, "fp8_recipe": f.recipe, "fp8_param": f.fp8_params,
           "first_last_layers_bf16": f.first_last_layers_bf16}
    if f.recipe == "delayed":
        out.update(fp8_margin=f.margin, fp8_amax_history_len=f.amax_history_len,
                   fp8_amax_compute_algo=f.amax_compute_algo)
    return out


def transformer_config_kwargs(cfg) -> dict:
    """megatron-core ``TransformerConfig(**kwargs)`` for RunConfig ``cfg``'s model, parallel layout
    and precision. The QK-norm is not megatron's (``qk_layernorm`` stays False): omni's per-head and
    shared norms come in through the layer spec, so their gradients are reduced as their own
    (megatron sums ``qk_layernorm`` grads over TP ranks by name, wrong for per-head weights)."""
    import torch

    m, p, t = cfg.model, cfg.parallel, cfg.train

    half = t.precision in ("bf16", "fp8")
    kw = {
        "num_layers": m.n_layers,
        "hidden_size": m.dim,
        "num_attention_heads": m.n_heads,
        "num_query_groups": m.n_kv_heads,
        "kv_channels": m.head_dim,
        "ffn_hidden_size": m.ffn_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": m.norm_eps,
        "gated_linear_unit": True,  # SwiGLU: fc1 = [gate; up], silu(gate) * up
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "qk_layernorm": False,
        "hidden_dropout": m.dropout,
        "attention_dropout": m.attention_dropout,
        "init_method_std": m.init_std,
        # omni scales the output projections' std by 1/sqrt(2 n_layers): megatron's scaled init
        "apply_residual_connection_post_layernorm": False,
        "persist_layer_norm": False,
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "masked_softmax_fusion": False,
        "gradient_accumulation_fusion": False,
        "tensor_model_parallel_size": p.tensor,
        "pipeline_model_parallel_size": p.pipeline,
        "virtual_pipeline_model_parallel_size": p.virtual_pipeline if p.virtual_pipeline > 1 else None,
        "context_parallel_size": p.context,
        "sequence_parallel": p.sequence_parallel,
        "bf16": half,
        "params_dtype": torch.bfloat16 if half else torch.float32,
        "pipeline_dtype": torch.bfloat16 if half else torch.float32,  # required for PP > 1
        # Interleaved schedule: overlapped, unbatched p2p (Megatron-LM's default with a virtual pipeline).
        # Batched p2p with PP=2 on gloo matches the send/recv of the one peer in the wrong order: a
        # loss off by ~0.01-0.05 and wrong gradients, no error (tests/megatron/ reproduce it).
        "overlap_p2p_comm": p.virtual_pipeline > 1,
        "batch_p2p_comm": p.virtual_pipeline == 1,
        # The local spec's attention softmax in fp32 under bf16, as omni's SDPA accumulates (no-op in fp32;
        # TE's fused attention ignores it)
        "attention_softmax_in_fp32": True,
        **fp8_kwargs(t),
    }
    return kw


__all__ = ["Machine", "probe", "check_megatron", "fp8_kwargs", "transformer_config_kwargs"]
