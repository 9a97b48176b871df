"""omni's loss on megatron's vocab-parallel logits (the last pipeline stage).

``GPTModel.forward`` without labels returns the logits [b, s, Vp/TP] (it transposes megatron's
[s, b, ...] back), each TP rank holding the contiguous vocab columns [r * Vp/TP, (r+1) * Vp/TP) of
the padded vocab (convert.padded_vocab_size). omni's loss (omni.model.OmniDecoder._loss) is, over the
scored targets t with weights w_t (valid mask x SFT mask x modality loss weight, as
omni/train/loop.py passes ``loss_mask``)::

    ce_t  = logsumexp(logits_t) - logits_t[target_t]          (over the real vocab only)
    loss  = sum_t w_t ce_t / W  +  z_loss * sum_t w_t logsumexp(logits_t)^2 / W,   W = max(sum_t w_t, 1)

Here logsumexp runs across TP ranks: the row max is all-reduced (MAX), then the sum of exp(x - max)
(SUM), as megatron's ``tensor_parallel.vocab_parallel_cross_entropy`` does. That function is not
called as is, for three reasons: it returns only the cross entropy (the z-loss needs logsumexp
too), it would count the padded vocab columns (logit 0 each) in the softmax, which omni's vocab has
not, and it subtracts the max in place from fp32 logits (the caller's tensor). :class:`_VocabParallelCEAndLSE`
is its algorithm with the padding masked, returning both per-token values from one softmax buffer
(as omni.model.CrossEntropyLSE); the tests compare its cross entropy with megatron's function.

Results are sums, not means: with micro-batches, pipeline and data parallelism the trainer
normalizes by the weight of the whole global batch (as the torch trainer does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni.model import IGNORE_INDEX, MODALITIES

N_MODALITY_SLOTS = len(MODALITIES) + 1
"""Per-modality sums have one slot per omni.vocab modality id 0..4 (text, special, image, audio, unused)."""


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


class _VocabParallelCEAndLSE(torch.autograd.Function):
    """Per-token cross entropy and logsumexp over vocab-parallel logits, padded columns excluded.

    logits [N, Vl] (this TP rank's columns [start, start + Vl) of the padded vocab), target [N]
    (global ids < vocab_size) -> (ce [N], lse [N]) in fp32, equal on every TP rank.
    Backward: d(g_ce ce + g_lse lse)/dx = softmax(x) (g_ce + g_lse) - g_ce onehot(target).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_size: int, group):
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        n, vl = logits.shape
        start = rank * vl
        real = max(0, min(vl, vocab_size - start))  # this rank's columns that are real vocabulary
        x = logits.float()
        # 1. row max over the real vocab of all ranks (a rank of padding only contributes -inf)
        row_max = x[:, :real].amax(dim=-1) if real else x.new_full((n,), float("-inf"))
        if world > 1:
            torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = x - row_max[:, None]  # a new [N, Vl] buffer (the caller's logits stay untouched)
        shifted[:, real:] = float("-inf")  # padded vocab rows: probability 0
        # 2. the target's shifted logit, from the rank that holds it (0 elsewhere), summed over ranks
        local = (target >= start) & (target < start + real)
        idx = (target - start).clamp(0, vl - 1)  # any in-range column for targets of other ranks
        target_logit = torch.where(local, shifted.gather(1, idx[:, None]).squeeze(1), 0.0)
        # 3. sum of exp over all ranks; shifted becomes the softmax numerator in place
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if world > 1:
            torch.distributed.all_reduce(target_logit, group=group)
            torch.distributed.all_reduce(sum_exp, group=group)
        log_z = sum_exp.log()  # logsumexp - row_max
        ce = log_z - target_logit
        lse = log_z + row_max
        softmax = exp.div_(sum_exp[:, None])  # [N, Vl], this rank's columns
        ctx.save_for_backward(softmax, idx, local)
        ctx.logits_dtype = logits.dtype
        return ce, lse

    @staticmethod
    def backward(ctx, g_ce: torch.Tensor, g_lse: torch.Tensor):
        softmax, idx, local = ctx.saved_tensors
        # in place on the saved softmax (backward runs once, as megatron's cross entropy assumes)
        grad = softmax.mul_((g_ce + g_lse)[:, None])
        grad.scatter_add_(1, idx[:, None], torch.where(local, -g_ce, 0.0)[:, None])
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_ce_lse(logits: torch.Tensor, target: torch.Tensor, vocab_size: int):
    """(ce, lse), each of target's shape, from vocab-parallel ``logits`` [..., Vp/TP] and global
    target ids [...] (< vocab_size). Columns at or past vocab_size (padding) are excluded."""
    vl = logits.shape[-1]
    ce, lse = _VocabParallelCEAndLSE.apply(logits.reshape(-1, vl), target.reshape(-1), vocab_size, _tp_group())
    return ce.view(target.shape), lse.view(target.shape)


@dataclass
class LossSums:
    """One micro-batch's loss terms, summed over its targets (identical on every TP rank)."""

    loss: torch.Tensor
    """Scalar, differentiable: sum_t w_t ce_t + z_loss * sum_t w_t lse_t^2 (backward this, divided by
    the global batch's weight)."""
    ce: torch.Tensor
    """Scalar, detached: sum_t w_t ce_t."""
    z: torch.Tensor
    """Scalar, detached: sum_t w_t lse_t^2 (before the z_loss coefficient)."""
    weight: torch.Tensor
    """Scalar: sum_t w_t, the normalizer."""
    modality_ce: torch.Tensor | None = None
    """[5] detached: sum of w_t ce_t by the modality of the target (omni.vocab ids: text, special,
    image, audio, unused); None without a modality table."""
    modality_tokens: torch.Tensor | None = None
    """[5]: targets with w_t > 0 by modality."""

    def means(self, z_loss: float) -> dict:
        """omni.model.DecoderOutput's values for this micro-batch alone: loss, ce_loss, z_loss (means
        over W = max(weight, 1)) and the mean cross entropy per modality present."""
        denom = self.weight.clamp_min(1.0)
        ce, z = self.ce / denom, self.z / denom
        out = {"loss": ce + z_loss * z if z_loss else ce, "ce_loss": ce, "z_loss": z, "loss_by_modality": {}}
        if self.modality_ce is not None:
            for i, name in enumerate(MODALITIES):
                if self.modality_tokens[i] > 0:
                    out["loss_by_modality"][name] = self.modality_ce[i] / self.modality_tokens[i]
        return out


def loss_sums(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None, *,
              vocab_size: int, z_loss: float, modality_table: torch.Tensor | None = None,
              modality: torch.Tensor | None = None) -> LossSums:
    """omni's loss terms from the last stage's vocab-parallel logits.

    logits: [b, s, Vp/TP] (GPTModel's output without labels; any layout whose leading dims match
        labels). labels: [b, s] target ids, already shifted; IGNORE_INDEX (-100) is never scored.
    loss_mask: [b, s] float weight per target (omni/train/loop.py's: valid/SFT mask x modality loss
        weight); None = 1 for every valid target. vocab_size: the real vocab (omni's); z_loss: its
        coefficient (model.z_loss). modality_table: [V] omni.vocab modality of every id, for the
        per-modality sums (or modality: [b, s] the modality of each target).
    """
    valid = labels != IGNORE_INDEX
    weight = valid.float() if loss_mask is None else loss_mask.float() * valid
    target = labels.masked_fill(~valid, 0)
    ce, lse = vocab_parallel_ce_lse(logits, target, vocab_size)  # [b, s] each, fp32
    ce_sum = (ce * weight).sum()
    z_sum = (lse.square() * weight).sum()
    out = LossSums(loss=ce_sum + z_loss * z_sum if z_loss else ce_sum, ce=ce_sum.detach(), z=z_sum.detach(),
                   weight=weight.sum())
    if modality is None and modality_table is not None:
        modality = modality_table.to(target.device)[target]
    if modality is not None:
        with torch.no_grad():
            mod = modality.long().clamp(0, N_MODALITY_SLOTS - 1).reshape(-1)
            out.modality_ce = torch.zeros(N_MODALITY_SLOTS, device=ce.device).index_add_(
                0, mod, (ce * weight).reshape(-1))
            out.modality_tokens = torch.zeros(N_MODALITY_SLOTS, device=ce.device).index_add_(
                0, mod, (weight > 0).float().reshape(-1))
    return out


__all__ = ["LossSums", "loss_sums", "vocab_parallel_ce_lse", "N_MODALITY_SLOTS"]
