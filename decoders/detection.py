"""The detection head behind ``<det>``: a DETR-style set predictor over the decoder's states.

VisionLLM v2 (Wu et al. 2024, https://arxiv.org/abs/2406.08394) routes a request such as
"find every red circle" to a detector: the decoder emits ``<det>``, K learned super-link query
embeddings follow it, and the decoder's final hidden states at those K slots (the *query states*)
condition the detector, which also reads the image tokens' hidden states (the *context states*).
The detector here is DETR's (Carion et al., "End-to-End Object Detection with Transformers", 2020,
https://arxiv.org/abs/2005.12872), at toy size and without its CNN backbone and encoder: the
decoder's image-token states already are contextualized features, and in an early-fusion
sequence, where the request precedes the image, they have already attended to the request (the
lever ``shared/notes/heads-calibration.md`` measured: a request added to the object queries alone
is ignored).

Data flow (B batch, K super-link slots, N = h*w image tokens, D decoder width, d head width,
Q object queries, L decoder layers)::

    context_states  [B, N, D] --LayerNorm, Linear D->d--> + 2-D sine positions of the h x w grid  [B, N, d]
    query_states    [B, K, D] --LayerNorm, Linear D->d--> + learned "link" type embedding         [B, K, d]
    memory          [B, N+K, d] = [image tokens ; query states]
    object queries  [B, Q, d]   = Q learned embeddings + Linear(mean over K of the query states)
    L x nn.TransformerDecoderLayer (self-attention among the Q, cross-attention to the memory, FFN)
    after each layer: shared LayerNorm, then
        logits [L, B, Q, 2]  (object, no-object)       Linear d->2
        boxes  [L, B, Q, 4]  (cx, cy, w, h) in [0, 1]  3-layer MLP d->d->d->4, sigmoid

Training (DETR section 3.1): each layer's Q predictions are matched one-to-one to the image's n
target boxes by the Hungarian algorithm (scipy's ``linear_sum_assignment``) on the cost
``-w_class * p(object) + w_l1 * |b - b'|_1 - w_giou * GIoU(b, b')``; unmatched queries learn
"no object". An (image, request) pair with no target (a colour/shape pair that is absent) has every
query learn "no object". Loss terms (weights applied, so their sum is DETR's loss)::

    det_ce   = w_class * CE(logits, matched ? object : no-object), class weights [1, no_object_weight]
    det_l1   = w_l1 * sum_matched |b - b'|_1 / n_boxes
    det_giou = w_giou * sum_matched (1 - GIoU(b, b')) / n_boxes

each summed over the decoder layers (auxiliary losses, DETR section 3.2) when ``aux_loss``;
``n_boxes`` is the batch's number of target boxes, at least 1.

Why two-way softmax and not one sigmoid logit with focal loss (Deformable DETR): with one category
and Q = 16 queries, the imbalance focal loss answers (hundreds of queries, most background) is
small, DETR's down-weighted no-object class (0.1) handles it, and the calibration run reached its
figures with exactly that loss. The score of a box is softmax(logits)[object].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni.config.heads import DetectionHeadConfig, check_grid, max_boxes
from omni.decoders.base import TaskHead
from omni.decoders.boxes import cxcywh_to_xyxy, generalized_box_iou
from omni.errors import OmniError

OBJECT, NO_OBJECT = 0, 1
"""Indices of the two classes in the last dim of :attr:`DetectionOutput.logits`."""


@dataclass
class DetectionOutput:
    """What :meth:`DetectionHead.forward` returns: every decoder layer's predictions, the last at index -1."""

    boxes: torch.Tensor
    """float [L, B, Q, 4]: (cx, cy, w, h) in [0, 1] of the image side, per decoder layer."""
    logits: torch.Tensor
    """float [L, B, Q, 2]: (object, no-object) logits, per decoder layer."""

    @property
    def scores(self) -> torch.Tensor:
        """float [B, Q]: the last layer's probability that each query holds an object."""
        return self.logits[-1].float().softmax(-1)[..., OBJECT]


def sine_positions(h: int, w: int, dim: int, device=None, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine position embeddings of an h x w grid, row-major -> [h*w, dim] (DETR's PositionEmbeddingSine).

    Cell centres are normalized to (0, 2*pi) on each axis, so grids of any size share one scale;
    y takes the first dim/2 channels and x the rest, each as interleaved sin/cos of
    pos / temperature^(2i/(dim/2)) (Vaswani et al. 2017, per axis).
    """
    npf = dim // 2  # channels per axis
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi  # [h]
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi  # [w]
    i = torch.arange(npf, device=device, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / npf)  # [npf]
    py, px = y[:, None] / freq, x[:, None] / freq  # [h, npf], [w, npf]
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)  # [h, npf]
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)  # [w, npf]
    return torch.cat((py[:, None].expand(h, w, npf), px[None].expand(h, w, npf)), dim=-1).reshape(h * w, dim)


class MLP(nn.Module):
    """Linear-ReLU stack, DETR's box head: d -> d -> ... -> out."""

    def __init__(self, dim: int, hidden: int, out: int, n_layers: int):
        super().__init__()
        sizes = [dim] + [hidden] * (n_layers - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------
def linear_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of cost [Q, n] (n <= Q) -> (query indices [n], target indices [n]).

    Every target gets one query (the Hungarian algorithm, as scipy's ``linear_sum_assignment``);
    sorted by query index. n = 0 gives two empty index tensors.
    """
    from scipy.optimize import linear_sum_assignment

    assert cost.ndim == 2 and cost.shape[1] <= cost.shape[0], cost.shape
    if cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def match_cost(logits: torch.Tensor, boxes: torch.Tensor, target: torch.Tensor,
               class_weight: float, l1_weight: float, giou_weight: float) -> torch.Tensor:
    """DETR's matching cost of one image: logits [Q, 2], boxes [Q, 4] and target [n, 4] (cxcywh) -> [Q, n].

    cost = -class_weight * p(object) + l1_weight * |b - b'|_1 - giou_weight * GIoU(b, b')
    (DETR's HungarianMatcher; the 1 of its -(1 - p) drops out of the argmin).
    """
    prob = logits.float().softmax(-1)[:, OBJECT]  # [Q]
    boxes, target = boxes.float(), target.float()
    cost_l1 = torch.cdist(boxes, target, p=1)  # [Q, n]
    cost_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target))  # [Q, n]
    return class_weight * -prob[:, None] + l1_weight * cost_l1 + giou_weight * cost_giou


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: list[torch.Tensor],
                    class_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer's matching: logits [B, Q, 2], boxes [B, Q, 4], targets B x [n_i, 4] -> B x (query idx, target idx).

    Each pair of index tensors has length n_i (empty for an image without targets).
    """
    return [linear_assignment(match_cost(lg, bx, t.to(bx.device), class_weight, l1_weight, giou_weight))
            for lg, bx, t in zip(logits, boxes, targets)]


# ----------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------
class DetectionHead(TaskHead):
    """DETR-style detector behind ``<det>``: K query states + N image-token states -> Q boxes and scores."""

    kind = "detr"
    routing_token = "<det>"

    def __init__(self, dim: int, cfg: DetectionHeadConfig | None = None, **overrides):
        """``dim``: D, the hidden size of the decoder whose states the head reads."""
        super().__init__()
        if cfg is None:
            cfg = DetectionHeadConfig(**overrides)
        elif overrides:
            raise OmniError(f"DetectionHead takes a config or keyword overrides, not both (got {sorted(overrides)})")
        if not isinstance(dim, int) or dim < 1:
            raise OmniError(f"DetectionHead dim={dim!r}: expected the decoder's hidden size, a positive integer")
        self.cfg, self.dim = cfg, dim
        D, d = dim, cfg.width
        # Decoder hidden states grow in scale with depth (pre-norm residual stream): normalize first.
        self.context_norm, self.context_proj = nn.LayerNorm(D), nn.Linear(D, d)
        self.query_norm, self.query_proj = nn.LayerNorm(D), nn.Linear(D, d)
        self.link_embed = nn.Parameter(torch.zeros(d))  # marks the K query-state slots of the memory
        self.request_proj = nn.Linear(d, d)  # mean query state -> shift of every object query
        self.object_queries = nn.Embedding(cfg.n_objects, d)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(d, cfg.n_heads, cfg.ffn_dim, cfg.dropout, activation="relu",
                                       batch_first=True, norm_first=True)
            for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)  # pre-norm layers leave the output un-normalized; shared by all layers
        self.class_head = nn.Linear(d, 2)
        self.box_head = MLP(d, d, 4, 3)
        nn.init.normal_(self.link_embed, std=0.02)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, query_states: torch.Tensor, context_states: torch.Tensor,
                context_mask: torch.Tensor | None = None, *, grid: tuple[int, int] | None = None,
                ) -> DetectionOutput:
        """query_states [B, K, D], context_states [B, N, D] (an image block, N = h*w, row-major),
        context_mask bool [B, N] (True = real) or None, grid (h, w) (default: the config's) -> DetectionOutput."""
        cfg = self.cfg
        h, w = self._grid(grid, context_states)
        if query_states.ndim != 3 or query_states.shape[-1] != self.dim:
            raise OmniError(f"query_states must be [B, K, D={self.dim}], got {tuple(query_states.shape)}")
        B, K, _ = query_states.shape
        N = context_states.shape[1]
        if context_states.shape[0] != B:
            raise OmniError(f"query_states hold {B} rows but context_states {context_states.shape[0]}")
        if context_mask is not None and tuple(context_mask.shape) != (B, N):
            raise OmniError(f"context_mask must be [B={B}, N={N}], got {tuple(context_mask.shape)}")

        pos = sine_positions(h, w, cfg.width, device=context_states.device)  # [N, d]
        image = self.context_proj(self.context_norm(context_states)) + pos.to(context_states.dtype)  # [B, N, d]
        link = self.query_proj(self.query_norm(query_states))  # [B, K, d]
        memory = torch.cat((image, link + self.link_embed), dim=1)  # [B, N+K, d]
        pad = None
        if context_mask is not None:  # True = ignore (torch's key_padding_mask); query slots are always real
            pad = torch.cat((~context_mask.bool(), context_mask.new_zeros(B, K, dtype=torch.bool)), dim=1)

        # Object queries: learned slots shifted by the request, so every slot knows what is asked
        # (it also reaches them through cross-attention to the K link slots of the memory).
        x = self.object_queries.weight[None] + self.request_proj(link.mean(1))[:, None]  # [B, Q, d]
        hs = []
        for layer in self.layers:
            x = layer(x, memory, memory_key_padding_mask=pad)  # [B, Q, d]
            hs.append(self.norm(x))
        hs = torch.stack(hs)  # [L, B, Q, d]
        return DetectionOutput(boxes=self.box_head(hs).sigmoid(), logits=self.class_head(hs))

    def _grid(self, grid, context_states: torch.Tensor) -> tuple[int, int]:
        if context_states.ndim != 3 or context_states.shape[-1] != self.dim:
            raise OmniError(f"context_states must be [B, N, D={self.dim}], got {tuple(context_states.shape)}")
        if grid is None:
            grid = self.cfg.grid
            if grid is None:
                raise OmniError("the detection head needs the image-token grid (h, w): pass grid= to forward "
                                "or set it in DetectionHeadConfig.grid")
        h, w = check_grid(grid, "grid")
        N = context_states.shape[1]
        if N != h * w:
            raise OmniError(f"context_states hold N={N} image tokens but grid {h}x{w} has {h * w}: "
                            f"pass the image block's own grid (N = h*w)")
        return h, w

    # --- loss ------------------------------------------------------------------------------------
    def check_targets(self, targets, batch: int) -> list[torch.Tensor]:
        """Validate targets (B x float [n_i, 4], cxcywh in [0, 1], w and h > 0) and return them as float tensors."""
        if not isinstance(targets, (list, tuple)) or len(targets) != batch:
            n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise OmniError(f"targets must be a list of {batch} box tensors [n_i, 4] (one per image), got {n}")
        out = []
        for i, t in enumerate(targets):
            t = torch.as_tensor(t, dtype=torch.float32)
            if t.numel() == 0:
                t = t.reshape(0, 4)
            if t.ndim != 2 or t.shape[1] != 4:
                raise OmniError(f"targets[{i}] must be [n, 4] boxes (cx, cy, w, h), got shape {tuple(t.shape)}")
            if t.shape[0] > max_boxes(self.cfg):
                raise OmniError(f"targets[{i}] holds {t.shape[0]} boxes, more than max_objects="
                                f"{max_boxes(self.cfg)} (n_objects={self.cfg.n_objects})")
            if t.numel() and not (torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1):
                raise OmniError(f"targets[{i}] has values outside [0, 1] (min {t.min().item():.4g}, max "
                                f"{t.max().item():.4g}): boxes are (cx, cy, w, h) as fractions of the image side")
            if t.numel() and (t[:, 2:] <= 0).any():
                raise OmniError(f"targets[{i}] has a box of zero width or height")
            out.append(t)
        return out

    def loss(self, outputs: DetectionOutput, targets) -> dict[str, torch.Tensor]:
        """det_ce, det_l1, det_giou (weights applied; summed over layers when aux_loss) of ``outputs``
        against targets: a list of B float tensors [n_i, 4], (cx, cy, w, h) in [0, 1]; n_i may be 0."""
        cfg = self.cfg
        L, B, Q, _ = outputs.boxes.shape
        device = outputs.boxes.device
        targets = [t.to(device) for t in self.check_targets(targets, B)]
        # DETR also all-reduces n_boxes over data-parallel ranks; here it is this batch's
        n_boxes = max(sum(len(t) for t in targets), 1)
        class_weights = torch.tensor([1.0, cfg.no_object_weight], device=device)
        layers = range(L) if cfg.aux_loss else [L - 1]
        ce = l1 = giou = outputs.boxes.new_zeros((), dtype=torch.float32)
        for layer in layers:
            logits, boxes = outputs.logits[layer].float(), outputs.boxes[layer].float()  # [B, Q, 2], [B, Q, 4]
            matches = hungarian_match(logits, boxes, targets, cfg.class_weight, cfg.l1_weight, cfg.giou_weight)
            b_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)]).to(device)
            q_idx = torch.cat([q for q, _ in matches]).to(device)
            matched_targets = torch.cat([t[j.to(device)] for t, (_, j) in zip(targets, matches)])  # [M, 4]

            labels = torch.full((B, Q), NO_OBJECT, dtype=torch.long, device=device)
            labels[b_idx, q_idx] = OBJECT
            # weighted mean over all B*Q queries: sum_i w_{y_i} CE_i / sum_i w_{y_i} (F.cross_entropy with weight)
            ce = ce + F.cross_entropy(logits.reshape(B * Q, 2), labels.reshape(B * Q), weight=class_weights)

            pred = boxes[b_idx, q_idx]  # [M, 4]; M = 0 when no image has a target (sums are 0, still in the graph)
            l1 = l1 + (pred - matched_targets).abs().sum() / n_boxes
            g = generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(matched_targets)).diagonal()  # [M]
            giou = giou + (1 - g).sum() / n_boxes
        return {"det_ce": cfg.class_weight * ce, "det_l1": cfg.l1_weight * l1, "det_giou": cfg.giou_weight * giou}

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, outputs: DetectionOutput, threshold: float = 0.5,
                ) -> list[list[tuple[tuple[float, float, float, float], float]]]:
        """Per image: [(box (x0, y0, x1, y1) in [0, 1], score), ...] of the last layer's queries scoring
        at least ``threshold``, highest score first (threshold 0 keeps all Q, as AP wants)."""
        scores = outputs.scores.cpu()  # [B, Q]
        boxes = cxcywh_to_xyxy(outputs.boxes[-1].float()).clamp(0, 1).cpu()  # [B, Q, 4]
        result = []
        for s, b in zip(scores, boxes):
            order = torch.argsort(s, descending=True, stable=True)
            result.append([(tuple(b[q].tolist()), float(s[q])) for q in order.tolist() if s[q] >= threshold])
        return result
