"""Box operations in torch: format conversion, area, pairwise IoU and generalized IoU.

Boxes are float tensors [..., 4], either ``cxcywh`` (center x, center y, width, height) or ``xyxy``
(left, top, right, bottom), in any unit (the detection head uses [0, 1] of the image side).
Pairwise functions take [N, 4] and [M, 4] xyxy boxes and return [N, M].

Generalized IoU: Rezatofighi et al., "Generalized Intersection over Union: A Metric and A Loss for
Bounding Box Regression", CVPR 2019 (https://arxiv.org/abs/1902.09630), Algorithm 1::

    GIoU(A, B) = IoU(A, B) - |C \\ (A u B)| / |C| = IoU(A, B) - (|C| - |A u B|) / |C|

with C the smallest box enclosing A and B. GIoU is in (-1, 1]: 1 for identical boxes, 0 for
touching ones, and it keeps falling as disjoint boxes move apart (where IoU stays 0 and gives no
gradient). The same as DETR's ``util/box_ops.py`` (Carion et al. 2020).
"""

from __future__ import annotations

import torch

EPS = 1e-12
"""Floor of the divisors (unions, enclosing areas), so zero-area boxes give finite values."""


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) -> ((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0)."""
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...]: (x1 - x0) * (y1 - y0)."""
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of xyxy boxes a [N, 4] and b [M, 4] -> (iou [N, M], union [N, M])."""
    area_a, area_b = box_area(a), box_area(b)  # [N], [M]
    lt = torch.max(a[:, None, :2], b[None, :, :2])  # [N, M, 2] top-left of the intersection
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2] bottom-right
    wh = (rb - lt).clamp(min=0)  # empty intersections have zero size
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = area_a[:, None] + area_b[None, :] - inter  # |A u B| = |A| + |B| - |A n B|
    return inter / union.clamp(min=EPS), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M] in (-1, 1].

    GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest box enclosing A and B (Rezatofighi et al.
    2019, Algorithm 1). Boxes must be well formed (x1 >= x0, y1 >= y0).
    """
    assert (a[:, 2:] >= a[:, :2]).all() and (b[:, 2:] >= b[:, :2]).all(), "boxes must be xyxy with x1>=x0, y1>=y0"
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])  # [N, M, 2] enclosing box C
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]  # |C|
    return iou - (enclosing - union) / enclosing.clamp(min=EPS)
