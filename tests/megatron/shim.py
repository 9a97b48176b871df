"""Test-only CPU shim: runs megatron-core 0.16.1's CUDA-only call sites on a CPU with gloo.

Product code never patches megatron-core; the tests of parallel/megatron/ (and the megatron trainer's)
call :func:`apply` at the top of each torchrun worker, before building a model. The nine redirects
are the ones /work/shared/notes/megatron-core-on-cpu.md lists (verified there on this machine).

Every redirect first checks that what it replaces still exists with the parameters it had in
megatron-core 0.16.1 / torch 2.13 (``inspect.signature``), so an upgrade that moves or changes one
fails here, loudly, instead of silently running a CUDA path or skipping a patch. :func:`check`
runs only those checks (no patching): a plain pytest can call it without touching the process.

What the shim hides: a tensor that product code forgets to move to the GPU still "works" here (every
device is the CPU). Device placement is only proven on a GPU.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import torch

_APPLIED = False

# Modules whose functions allocate with a literal device="cuda" (torch.zeros(..., device="cuda") and
# the like). Their module-global ``torch`` is replaced by a proxy that allocates on the CPU instead.
# The ones in parentheses are the trainer's (optimizer, DDP, checkpointing), not this folder's tests.
CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens = torch.zeros([], device="cuda")
    "megatron.core.utils",  # (grad-norm / param-hash helpers)
    "megatron.core.optimizer.optimizer",  # (found_inf, _scale_one, ...)
    "megatron.core.optimizer.clip_grads",  # (total_norm, grad_norm buffers)
    "megatron.core.optimizer.grad_scaler",  # (loss scale tensors)
    "megatron.core.optimizer.distrib_optimizer",  # (DistributedOptimizer buffers)
    "megatron.core.distributed.param_and_grad_buffer",  # (a warm-up tensor of the bucket groups)
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # (the reuse-verification flag)
    "megatron.core.dist_checkpointing.exchange_utils",  # (receive buffers of the load exchange)
)


@dataclass(frozen=True)
class Redirect:
    """One patch: what it replaces, why, and the parameters the replaced callable must still have."""

    target: str
    """Dotted path of the replaced attribute (module.attr or module.Class.attr)."""
    reason: str
    """Why it is needed on a CPU (one line)."""
    params: tuple[str, ...] | None
    """Parameter names of the original (None: a builtin without a signature; only its presence is checked)."""


REDIRECTS = (
    Redirect("torch.cuda.current_device",
             "the allocation device of TP/p2p/RoPE/DDP buffers; returns the CPU device instead of an index",
             ()),
    Redirect("torch.cuda.synchronize",
             "p2p batch sync, DDP, dist_checkpointing wait for CUDA streams; CPU ops are synchronous: no-op",
             ("device",)),
    Redirect("megatron.core.tensor_parallel.random._get_cuda_rng_state",
             "the RNG tracker's fork and recompute save the CUDA generator; use the CPU generator",
             ("device", "clone", "graph_safe")),
    Redirect("megatron.core.tensor_parallel.random._set_cuda_rng_state",
             "the RNG tracker's fork and recompute restore the CUDA generator; use the CPU generator",
             ("new_state", "device", "graph_safe")),
    Redirect("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add",
             "model_parallel_cuda_manual_seed seeds named CUDA RNG states; seed CPU-generator states",
             ("self", "name", "seed")),
    Redirect("megatron.core.transformer.utils.get_default_causal_mask",
             "the causal mask made when no attention_mask is passed is allocated on CUDA",
             ("sq",)),
    Redirect("<module>.torch (device='cuda' factories)",
             "schedules/optimizer/clip_grads/grad_scaler/DistOpt/buffers/utils/checkpointing allocate "
             "with a literal device='cuda'; allocate on the CPU",
             None),
    Redirect("torch.Tensor.type",
             "DistOpt's wrap and clip_grads assert Tensor.type() == 'torch.cuda.FloatTensor'; report "
             "CUDA type names for CPU tensors",
             None),
    Redirect("torch.Tensor.cuda",
             "tied embeddings across pipeline stages (weight.data.cuda()), DistOpt's fully_reshardable "
             "save and the checkpoint exchange move tensors to CUDA; identity",
             None),
)


def _resolve(path: str):
    """(owner, attribute name, current value) of a dotted path like pkg.mod.Class.attr."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1], getattr(owner, parts[-1])
    raise AssertionError(f"shim: cannot import {path}")


def check() -> None:
    """Assert that every patched callable still exists with the parameters of megatron-core 0.16.1
    (and torch 2.13); touches nothing. AssertionError naming the target when one changed."""
    import megatron.core

    assert megatron.core.__version__.startswith("0.16."), (
        f"shim written for megatron-core 0.16.x, found {megatron.core.__version__}: re-verify each redirect "
        "(see /work/shared/notes/megatron-core-on-cpu.md) and update the expected signatures")
    for r in REDIRECTS:
        if r.target.startswith("<module>"):
            for name in CUDA_FACTORY_MODULES:
                mod = importlib.import_module(name)
                assert getattr(mod, "torch", None) is torch or isinstance(getattr(mod, "torch", None), _CpuTorch), (
                    f"shim: {name} no longer uses a module-global `torch`; its device='cuda' redirect needs rework")
            continue
        _, _, fn = _resolve(r.target)
        assert callable(fn), f"shim: {r.target} is not callable any more"
        if r.params is None:
            continue
        original = getattr(fn, "__shim_original__", fn)
        got = tuple(inspect.signature(original).parameters)
        assert got == r.params, (f"shim: {r.target} changed its parameters from {r.params} to {got}; "
                                 "re-verify the redirect against the new megatron-core / torch")


# ----------------------------------------------------------------------------------------------
# The replacements
# ----------------------------------------------------------------------------------------------
def _current_device() -> torch.device:
    return torch.device("cpu")


def _synchronize(device=None) -> None:
    return None


def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    state = torch.get_rng_state()  # already a copy
    return state.clone() if clone else state


def _set_cuda_rng_state(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed) -> None:
    """CudaRNGStatesTracker.add with the CPU generator: a named state seeded with ``seed``."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


def _default_causal_mask(sq: int) -> torch.Tensor:
    """[sq, sq] bool, True above the diagonal (masked out), on the CPU."""
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_device(device):
    if device is None:
        return None
    d = torch.device(device) if isinstance(device, (str, torch.device)) else device
    return torch.device("cpu") if isinstance(d, torch.device) and d.type == "cuda" else device


class _CpuTorch(ModuleType):
    """Stands in for `torch` inside one megatron module: the same attributes, but the tensor factories
    allocate on the CPU when asked for device='cuda'."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like", "ones_like")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return attr(*args, **kwargs)
            return factory
        return attr


_ORIGINAL_TYPE = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    """Tensor.type(): a CPU tensor reports its CUDA type name ('torch.cuda.FloatTensor'); a
    conversion (dtype given) is the original."""
    if dtype is None and not kwargs:
        name = _ORIGINAL_TYPE(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
    return _ORIGINAL_TYPE(self, dtype, non_blocking, **kwargs)


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


class _DropForkWarning(logging.Filter):
    """The tracker's fork warns when the CPU generator changes inside it, which is now the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _install(path: str, new) -> None:
    owner, name, old = _resolve(path)
    if getattr(old, "__shim_original__", None) is not None:
        return  # already installed
    new.__shim_original__ = old
    setattr(owner, name, new)


def apply() -> None:
    """Install the nine redirects (idempotent). Call at the top of a torchrun worker, before building
    megatron-core models or process groups; never from product code or the pytest process itself."""
    global _APPLIED
    if _APPLIED:
        return
    check()
    from omni.parallel.megatron.config import CPU_SHIM_ENV

    os.environ[CPU_SHIM_ENV] = "1"  # check_megatron: the megatron backend may run without a GPU here
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    _install("torch.cuda.current_device", _current_device)
    _install("torch.cuda.synchronize", _synchronize)
    _install("megatron.core.tensor_parallel.random._get_cuda_rng_state", _get_cuda_rng_state)
    _install("megatron.core.tensor_parallel.random._set_cuda_rng_state", _set_cuda_rng_state)
    _install("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add", _tracker_add)
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropForkWarning())
    _install("megatron.core.transformer.utils.get_default_causal_mask", _default_causal_mask)
    # fused_softmax imported the mask function by name: replace its reference too
    assert fused_softmax.get_default_causal_mask is transformer_utils.get_default_causal_mask.__shim_original__
    fused_softmax.get_default_causal_mask = _default_causal_mask
    for name in CUDA_FACTORY_MODULES:
        mod = importlib.import_module(name)
        if not isinstance(mod.torch, _CpuTorch):
            mod.torch = _CpuTorch()
    _install("torch.Tensor.type", _tensor_type)
    _install("torch.Tensor.cuda", _tensor_cuda)
    _APPLIED = True


__all__ = ["REDIRECTS", "CUDA_FACTORY_MODULES", "check", "apply"]
