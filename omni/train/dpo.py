"""Preference tuning math: sigmoid DPO and LongWriter-V's IterDPO pairs (the pieces `train.stage: dpo` builds on).

DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, Eq. 7): with the
policy's and a frozen reference model's summed log-probabilities of the chosen response y_w and
the rejected one y_l given the same prompt x,

    L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

The implicit rewards r = beta * (log pi - log ref) of each side, their margin r_w - r_l, and the
share of pairs with a positive margin (accuracy) are what the trainer logs, as TRL's DPOTrainer
does. An optional SFT term adds the chosen side's mean negative log-likelihood per token
(``sft_weight``; RPO, Pang et al. 2024, arXiv 2404.19733).

IterDPO (Zhang et al. 2025, "LongWriter-V", arXiv 2502.14834, Sec. 3.3): a long output is split into
segments and corrected segment by segment; pair i holds the same inputs, the corrected output up
to segment i (chosen) and the original up to segment i (rejected), for every segment i that the
correction changed. Pairs of prefixes make each preference short where the corrections are,
instead of one pair of two whole long outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omni.errors import OmniError


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the scored targets of each row: ``logits`` [B, T, V], ``labels``
    [B, T] (already shifted: the target of position t), ``mask`` [B, T] (1 on response tokens, 0 on
    the prompt and padding) -> [B] float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    safe = labels.clamp_min(0)  # masked positions may hold IGNORE_INDEX
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return (tok * mask.float()).sum(-1)


@dataclass
class DPOOutput:
    """The loss and what the trainer logs, each a scalar tensor (the loss carries the gradient)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    """Mean beta * (log pi(y_w) - log ref(y_w)) over the pairs."""
    rejected_rewards: torch.Tensor
    """Mean beta * (log pi(y_l) - log ref(y_l))."""
    margin: torch.Tensor
    """Mean chosen minus rejected reward."""
    accuracy: torch.Tensor
    """Share of pairs whose chosen reward exceeds the rejected one."""


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, sft_weight: float = 0.0,
             chosen_tokens: torch.Tensor | None = None) -> DPOOutput:
    """Sigmoid DPO over a batch of pairs (each argument [P], summed response log-probs; the
    reference's carry no gradient). ``sft_weight`` > 0 adds that weight times the chosen side's
    negative log-likelihood per response token (``chosen_tokens`` [P] counts them)."""
    if beta <= 0:
        raise OmniError(f"train.dpo.beta={beta} must be > 0 (the DPO temperature; 0.1 is the usual choice)")
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise OmniError(f"dpo_loss expects four [P] tensors of one shape, got {sorted(map(tuple, shapes))}")
    chosen = beta * (policy_chosen - ref_chosen.detach())  # [P]
    rejected = beta * (policy_rejected - ref_rejected.detach())  # [P]
    loss = -F.logsigmoid(chosen - rejected).mean()  # Eq. 7
    if sft_weight > 0:
        if chosen_tokens is None:
            raise OmniError("dpo_loss: sft_weight > 0 needs chosen_tokens (response tokens of each chosen side)")
        loss = loss + sft_weight * (-policy_chosen / chosen_tokens.clamp_min(1)).mean()
    with torch.no_grad():
        return DPOOutput(loss, chosen.mean(), rejected.mean(), (chosen - rejected).mean(),
                         (chosen > rejected).float().mean())


def iterdpo_pairs(original: Sequence, corrected: Sequence) -> list[tuple[int, list, list]]:
    """IterDPO's prefix pairs of one long output: ``original`` and ``corrected`` are its segments
    (any objects comparable with ``==``; a segment the corrector kept is equal in both). Returns
    ``(i, chosen, rejected)`` = ``(i, corrected[:i + 1], original[:i + 1])`` for each segment i that
    the correction changed, in order; none when nothing changed."""
    if len(original) != len(corrected):
        raise OmniError(f"IterDPO needs the original and the corrected output in the same segments: "
                        f"{len(original)} vs {len(corrected)}")
    return [(i, list(corrected[:i + 1]), list(original[:i + 1]))
            for i in range(len(original)) if corrected[i] != original[i]]
