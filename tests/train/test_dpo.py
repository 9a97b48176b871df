"""Preference-tuning math (omni.train.dpo): sigmoid DPO against its formula, response-only log-probs, IterDPO pairs."""

from __future__ import annotations

import math

import pytest
import torch

from omni.errors import OmniError
from omni.train.dpo import dpo_loss, iterdpo_pairs, sequence_logps


def test_dpo_loss_equals_its_formula_on_hand_made_log_probs():
    pc, pr = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -18.0, -5.0])
    rc, rr = torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.0, -19.0, -4.0])
    beta = 0.5
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    z = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert z == [1.0, -1.0, 1.0]
    expected = sum(-math.log(1 / (1 + math.exp(-v))) for v in z) / 3  # -log sigmoid, Eq. 7
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.margin.item() == pytest.approx(sum(z) / 3) and out.accuracy.item() == pytest.approx(2 / 3)
    assert out.chosen_rewards.item() == pytest.approx(beta * ((1 - 1 + 1) / 3))
    # equal policy and reference: the loss is log 2 whatever the data
    assert dpo_loss(pc, pr, pc, pr).loss.item() == pytest.approx(math.log(2))
    # the SFT term: the chosen side's NLL per response token, weighted
    sft = dpo_loss(pc, pr, rc, rr, beta=beta, sft_weight=0.2, chosen_tokens=torch.tensor([5, 10, 5]))
    assert sft.loss.item() == pytest.approx(expected + 0.2 * (2 + 2 + 1) / 3, rel=1e-6)


def test_dpo_gradients_reach_the_policy_not_the_reference():
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    rc, rr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    dpo_loss(pc, pr, rc, rr, beta=0.1).loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # raise the chosen, lower the rejected
    assert rc.grad is None and rr.grad is None
    with pytest.raises(OmniError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(OmniError, match="one shape"):
        dpo_loss(pc, pr, rc, torch.zeros(2))


def test_sequence_logps_sum_only_the_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, -100, -100, -100]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    got = sequence_logps(logits, labels, mask)
    logp = torch.log_softmax(logits, -1)
    want0 = logp[0, 2, 3] + logp[0, 3, 4] + logp[0, 4, 5]  # the prompt's positions 0-1 get nothing
    want1 = logp[1, 0, 6] + logp[1, 1, 0]
    torch.testing.assert_close(got, torch.stack([want0, want1]))


def test_iterdpo_pairs_of_a_four_segment_output():
    original = ["a red circle", "a blue square", "a green triangle", "a red square"]
    corrected = ["a red circle", "a blue circle", "a green triangle", "a yellow square"]
    pairs = iterdpo_pairs(original, corrected)
    assert pairs == [
        (1, ["a red circle", "a blue circle"], ["a red circle", "a blue square"]),
        (3, corrected, original),
    ]
    assert iterdpo_pairs(original, original) == []
    with pytest.raises(OmniError, match="same segments"):
        iterdpo_pairs(original, corrected[:3])
    # the shared-prefix variant: the rejected side keeps the earlier corrections, differing in segment i only
    assert iterdpo_pairs(original, corrected, rejected_prefix="corrected") == [
        (1, ["a red circle", "a blue circle"], ["a red circle", "a blue square"]),
        (3, corrected, ["a red circle", "a blue circle", "a green triangle", "a red square"]),
    ]
    with pytest.raises(OmniError, match="rejected_prefix='shared' is invalid"):
        iterdpo_pairs(original, corrected, rejected_prefix="shared")
