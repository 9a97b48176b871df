"""The task-head interface and registry (omni.decoders.base): register by class or path, look up, errors."""

from __future__ import annotations

import pytest
import torch

from omni.decoders import base
from omni.decoders.base import TaskHead, head_class, register_head, registered_heads
from omni.errors import OmniError


class TinyHead(TaskHead):
    """One linear layer over the mean query state: the smallest head that trains."""

    kind = "tiny-test"
    routing_token = "<det>"

    def __init__(self, dim: int = 8, out: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(dim, out)

    def forward(self, query_states, context_states, context_mask=None):
        return self.proj(query_states.mean(dim=1))

    def loss(self, outputs, targets):
        return {"mse": torch.nn.functional.mse_loss(outputs, targets)}


@pytest.fixture(autouse=True)
def clean_registry():
    """Every test starts from and leaves behind the registry as it was."""
    saved = dict(base.HEADS)
    yield
    base.HEADS.clear()
    base.HEADS.update(saved)


def test_register_by_class_and_look_up():
    register_head("tiny-class", TinyHead)
    assert head_class("tiny-class") is TinyHead
    assert "tiny-class" in registered_heads()
    head = head_class("tiny-class")()
    q, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    out = head(q, ctx, torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == (2, 4)
    losses = head.loss(out, torch.zeros(2, 4))
    assert set(losses) == {"mse"} and losses["mse"].ndim == 0
    losses["mse"].backward()
    assert head.proj.weight.grad is not None
    assert isinstance(head, torch.nn.Module) and head.routing_token == "<det>"


def test_register_by_path_imports_on_first_use():
    path = f"{TinyHead.__module__}:TinyHead"
    register_head("tiny-path", path)
    assert base.HEADS["tiny-path"] == path  # not imported yet
    assert head_class("tiny-path") is TinyHead
    assert base.HEADS["tiny-path"] is TinyHead  # cached after the first look-up


def test_unknown_kind_names_the_registered_ones():
    base.HEADS.clear()
    with pytest.raises(OmniError, match="none registered yet"):
        head_class("detr")
    register_head("tiny-b", TinyHead)
    register_head("tiny-a", TinyHead)
    with pytest.raises(OmniError, match=r"unknown task head kind 'detr'.*tiny-a, tiny-b"):
        head_class("detr")


def test_bad_path_is_a_clear_error():
    register_head("tiny-missing", "omni.decoders.no_such_module:Head")
    with pytest.raises(OmniError, match="tiny-missing.*cannot be imported"):
        head_class("tiny-missing")


def test_forward_and_loss_are_abstract():
    class NoLoss(TaskHead):
        kind, routing_token = "no-loss", "<gen>"

        def forward(self, query_states, context_states, context_mask=None):
            return query_states

    class NoForward(TaskHead):
        kind, routing_token = "no-forward", "<gen>"

        def loss(self, outputs, targets):
            return {}

    for cls in (NoLoss, NoForward, TaskHead):
        with pytest.raises(TypeError):
            cls()
