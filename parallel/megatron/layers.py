"""omni's QK-norm as a megatron-core module, and which parameters skip weight decay.

:class:`QKNorm` goes into the layer spec as ``SelfAttentionSubmodules.q_layernorm`` /
``k_layernorm`` (see :func:`qk_norm_specs`). megatron-core 0.16.1's ``SelfAttention`` builds each as
``build_module(spec, hidden_size=head_dim, config=config, eps=config.layernorm_epsilon)`` and calls
it on the query [sq, b, heads/TP, head_dim] and the key [sq, b, kv_heads/TP, head_dim] right after
splitting the fused QKV projection, before RoPE: the same place as omni.model's Attention.

Megatron tells the module neither its head count nor omni's QK-norm epsilon (``eps`` is the block
norms' ``layernorm_epsilon``), so the spec carries them: ``n_heads`` (the global count: n_heads for
q, n_kv_heads for k), ``mode``, ``kind`` and ``qk_eps``. The module divides the head count by the
tensor-parallel size: a TP rank holds whole query groups (``check_megatron`` asks that TP divide
n_kv_heads), so its q heads and k heads are contiguous blocks of omni's.

Why not megatron's own ``qk_layernorm``: its norm has one [head_dim] weight for all heads (omni's
``shared``), and with ``config.qk_layernorm=True`` ``finalize_model_grads`` all-reduces every
parameter named q_layernorm/k_layernorm across TP ranks, which sums the gradients of *different*
heads for a per-head weight. Here ``config.qk_layernorm`` stays False and each variant makes its
own gradient right:

* ``per_head``: weight (and bias) [heads/TP, head_dim], a TP-sharded parameter (partition dim 0),
  like a column-parallel weight: each rank's gradient is already complete for its heads.
* ``shared``: one [head_dim] weight, replicated on every TP rank. A rank sees only its own heads,
  so its gradient is a partial sum: the weight enters the forward through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the gradient across TP
  in backward), so every rank ends backward with the gradient of all heads, whatever optimizer or
  DDP wrapper runs next.

Weight decay: omni decays matrices only. megatron's default rule (``wd_mult=0`` for 1-D and bias
parameters) would decay a per-head [heads, head_dim] weight; :func:`no_weight_decay` and
:func:`optimizer_config_overrides` exclude QK-norm parameters by an attribute this module sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

NO_WEIGHT_DECAY = "omni_no_weight_decay"
"""Attribute set (True) on parameters that omni never decays beyond 1-D ones and biases: the QK-norms."""


class QKNorm(MegatronModule):
    """Normalization of each query or key head over head_dim (omni.model.QKNorm on megatron's layout).

    Input and output [sq, b, heads_local, head_dim]. Statistics are over head_dim only (in fp32, as
    omni); ``per_head`` scales each head by its own [head_dim] weight (Chameleon), ``shared`` all heads
    by one. ``kind`` 'layernorm' has a bias, 'rmsnorm' not.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float | None = None, *,
                 n_heads: int, mode: str, kind: str, qk_eps: float):
        super().__init__(config)
        # eps: megatron passes config.layernorm_epsilon (the block norms'); omni's QK-norm has its own
        del eps
        if mode not in ("per_head", "shared") or kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"QKNorm: mode {mode!r} / kind {kind!r}")
        tp = config.tensor_model_parallel_size
        if n_heads % tp:
            raise ValueError(f"QKNorm: {n_heads} heads cannot be split over tensor_model_parallel_size={tp}")
        self.head_dim, self.mode, self.kind, self.eps = hidden_size, mode, kind, qk_eps
        self.heads_local = n_heads // tp
        shape = (self.heads_local, hidden_size) if mode == "per_head" else (hidden_size,)
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(shape, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) if kind == "layernorm" else None
        for p in self.parameters():
            setattr(p, NO_WEIGHT_DECAY, True)
            if mode == "per_head":  # a TP shard: rows = this rank's heads
                set_tensor_model_parallel_attributes(p, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [sq, b, heads_local, head_dim]
        assert x.shape[-2:] == (self.heads_local, self.head_dim), (tuple(x.shape), self.heads_local, self.head_dim)
        weight, bias = self.weight, self.bias
        if self.mode == "shared":
            # replicated weight, partial gradient per rank: sum it over TP in backward
            weight = copy_to_tensor_model_parallel_region(weight)
            bias = copy_to_tensor_model_parallel_region(bias) if bias is not None else None
        d = (self.head_dim,)
        if self.kind == "layernorm":
            return F.layer_norm(x.float(), d, eps=self.eps).to(x.dtype) * weight + bias
        return F.rms_norm(x.float(), d, eps=self.eps).to(x.dtype) * weight

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """dist_checkpointing view: per-head weights sharded over TP on dim 0 (global [heads, head_dim]),
        the shared weight replicated."""
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        axis = {name: 0 for name in state} if self.mode == "per_head" else {}
        return make_sharded_tensors_for_checkpoint(
            state, prefix, axis, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"])


def qk_norm_specs(model_cfg) -> tuple[ModuleSpec | None, ModuleSpec | None]:
    """(q_layernorm, k_layernorm) specs for omni's ModelConfig; (None, None) for qk_norm='none'."""
    if model_cfg.qk_norm == "none":
        return None, None
    common = {"mode": model_cfg.qk_norm, "kind": model_cfg.qk_norm_type, "qk_eps": model_cfg.qk_norm_eps}
    return (ModuleSpec(module=QKNorm, params={"n_heads": model_cfg.n_heads, **common}),
            ModuleSpec(module=QKNorm, params={"n_heads": model_cfg.n_kv_heads, **common}))


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """omni's rule: no decay on 1-D parameters (norms), biases and the QK-norms (2-D when per-head)."""
    return param.dim() < 2 or name.endswith(".bias") or bool(getattr(param, NO_WEIGHT_DECAY, False))


def param_groups(model_chunks, weight_decay: float) -> list[dict]:
    """torch.optim parameter groups over megatron model chunks: decay on matrices, none on the rest."""
    decay, no_decay = [], []
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if p.requires_grad:
                (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_config_overrides(optimizer_config) -> dict:
    """``config_overrides`` for megatron's ``get_megatron_optimizer``: its standard rule (wd_mult 0
    for 1-D and bias parameters) plus wd_mult 0 for the QK-norms. wd_mult is applied by megatron's
    ``OptimizerParamScheduler`` only: a trainer that sets weight decay itself must read each group's
    ``wd_mult``."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(optimizer_config)
    overrides[ParamKey(attr=NO_WEIGHT_DECAY)] = ParamGroupOverride(wd_mult=0.0)
    return overrides


__all__ = ["NO_WEIGHT_DECAY", "QKNorm", "qk_norm_specs", "no_weight_decay", "param_groups",
           "optimizer_config_overrides"]
