"""The small interface every task head implements, and the registry that finds them.

VisionLLM v2 (Wu et al. 2024, https://arxiv.org/abs/2406.08394): when the decoder emits a routing
token (``<det>``, ``<gen>``), K learned super-link query embeddings are appended after it; the
decoder's final hidden states at those K positions (the *query states*) condition the head bound to
that token, together with the hidden states of the context it reads (for detection, the image
tokens'). A head returns its outputs from :meth:`TaskHead.forward` and its named loss terms from
:meth:`TaskHead.loss`; their sum flows back into the decoder.

Heads are found by their registered ``kind`` (the name a config or checkpoint records), the same way
modality tokenizers are (:mod:`omni.tokenizers.base`): ``HEADS`` maps a kind to its class or to a
``"module:Class"`` path, imported on first use.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from omni.registry import Registry


class TaskHead(torch.nn.Module, abc.ABC):
    """A head behind a routing token: reads the K query states (and the context) and makes its outputs."""

    kind: ClassVar[str]
    """Registered name recorded in configs and checkpoints (for example 'detr')."""
    routing_token: ClassVar[str]
    """The routing token that calls this head: '<det>' or '<gen>'."""

    @abc.abstractmethod
    def forward(self, query_states: torch.Tensor, context_states: torch.Tensor,
                context_mask: torch.Tensor | None = None):
        """Run the head.

        ``query_states``: float [B, K, D], the decoder's final hidden states of the K super-link
        queries appended after the routing token. ``context_states``: float [B, T, D], the hidden
        states of the context the head reads (for detection, the image tokens). ``context_mask``:
        bool [B, T], True where ``context_states`` is real (False on padding); None means all real.
        Returns the head's outputs (whatever its :meth:`loss` and its users take).
        """

    @abc.abstractmethod
    def loss(self, outputs, targets) -> dict[str, torch.Tensor]:
        """Named scalar loss terms of ``outputs`` (from :meth:`forward`) against ``targets``.

        The trainer sums them (after any weights) and adds the sum to the decoder's loss.
        """


# kind -> TaskHead subclass or "module:Class". Built-in heads are imported only when first named.
HEADS = Registry("task head kind", "registered kinds", {"detr": "omni.decoders.detection:DetectionHead",
                                                         "diffusion": "omni.decoders.diffusion:DiffusionHead"})


def register_head(kind: str, cls_or_path: str | type[TaskHead]) -> None:
    """Make ``kind`` findable by :func:`head_class`; ``cls_or_path`` is a class or 'module:Class'."""
    HEADS.register(kind, cls_or_path)


def registered_heads() -> list[str]:
    """The registered kinds, sorted."""
    return HEADS.names()


def head_class(kind: str) -> type[TaskHead]:
    """The head class registered as ``kind`` (importing it on first use)."""
    return HEADS.load(kind)
