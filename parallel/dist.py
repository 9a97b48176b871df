"""Process groups and data parallelism for the plain-PyTorch backend (torchtitan's pattern:
the model is single-device code; parallelism is applied from outside).

* :func:`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and
  starts the process group: NCCL on GPUs, gloo on CPUs.
* :func:`parallelize` applies activation checkpointing per block, then DDP or FSDP2
  (``fully_shard`` per block, then the root) when there is more than one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from omni.config.train import ParallelConfig
from omni.errors import OmniError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    """One process: no group. Under torchrun: init the default group on the right device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if cuda else "gloo")
        if backend == "nccl" and not cuda:
            raise OmniError("parallel.dist_backend=nccl needs GPUs; this machine has none (use gloo or auto)")
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistInfo(rank, world, local, device)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every transformer block in backward (non-reentrant torch.utils.checkpoint)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def parallelize(model: nn.Module, cfg: ParallelConfig, info: DistInfo, activation_checkpointing: bool) -> nn.Module:
    """The module to train: the model itself, wrapped in DDP, or sharded in place with FSDP2."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not info.distributed:
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
