"""The <det> head (omni.decoders.detection), its box ops (omni.decoders.boxes) and COCO AP (omni.eval.detection).

Hungarian matching against brute force, GIoU against hand-computed values, AP of perfect,
perturbed and chance predictions, gradients into the decoder's states, a tiny head overfitting
four images to AP@0.5 = 1, and the user errors.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from omni.decoders import base
from omni.decoders.boxes import box_area, box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from omni.decoders.detection import (
    DetectionHead,
    DetectionHeadConfig,
    DetectionOutput,
    hungarian_match,
    linear_assignment,
    match_cost,
    sine_positions,
)
from omni.errors import OmniError
from omni.eval.detection import chance_predictions, coco_ap

D = 32  # decoder width of the tests


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_head(**kw) -> DetectionHead:
    cfg = {"width": 64, "n_objects": 8, "n_heads": 4, "ffn_dim": 128, "grid": (4, 4), **kw}
    return DetectionHead(D, DetectionHeadConfig(**cfg))


def four_targets() -> list[torch.Tensor]:
    """cxcywh targets of 4 images with 2, 0, 1 and 3 boxes."""
    return [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]),
            torch.zeros(0, 4),
            torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
            torch.tensor([[0.2, 0.8, 0.1, 0.2], [0.8, 0.2, 0.2, 0.1], [0.5, 0.5, 0.1, 0.1]])]


def as_xyxy_lists(targets) -> list[list[tuple]]:
    return [[tuple(b) for b in cxcywh_to_xyxy(t).tolist()] for t in targets]


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def test_registered_as_detr_behind_det():
    saved = dict(base.HEADS)
    try:
        if "detr" not in base.HEADS:  # base.py may already name it; register the path as it would
            base.register_head("detr", "omni.decoders.detection:DetectionHead")
        assert base.head_class("detr") is DetectionHead
        assert DetectionHead.kind == "detr" and DetectionHead.routing_token == "<det>"
        assert isinstance(tiny_head(), base.TaskHead)
    finally:
        base.HEADS.clear()
        base.HEADS.update(saved)


# ----------------------------------------------------------------------------------------------
# Box ops
# ----------------------------------------------------------------------------------------------
def giou1(a, b) -> float:
    return float(generalized_box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)))


def test_giou_of_hand_computed_boxes():
    # identical boxes: IoU 1, C = A u B -> 1
    assert giou1((0, 0, 1, 1), (0, 0, 1, 1)) == pytest.approx(1.0)
    # disjoint side by side: IoU 0, |C| = 3, |A u B| = 2 -> 0 - (3 - 2)/3
    assert giou1((0, 0, 1, 1), (2, 0, 3, 1)) == pytest.approx(-1 / 3)
    # disjoint diagonally: |C| = 9, |A u B| = 2 -> -7/9
    assert giou1((0, 0, 1, 1), (2, 2, 3, 3)) == pytest.approx(-7 / 9)
    # touching: IoU 0 and C = A u B -> 0
    assert giou1((0, 0, 1, 1), (1, 0, 2, 1)) == pytest.approx(0.0)
    # one inside the other: C = the outer box, so GIoU = IoU = 4/16
    assert giou1((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(0.25)
    # partial overlap: |A n B| = 1, |A u B| = 7, |C| = 9 -> 1/7 - 2/9
    assert giou1((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7 - 2 / 9)
    # symmetric, pairwise shape [N, M]
    a, b = torch.rand(3, 2), torch.rand(5, 2)
    a = torch.cat((a, a + torch.rand(3, 2)), 1)
    b = torch.cat((b, b + torch.rand(5, 2)), 1)
    g = generalized_box_iou(a, b)
    assert g.shape == (3, 5) and torch.allclose(g, generalized_box_iou(b, a).T)
    iou, _ = box_iou(a, b)
    assert (g <= iou + 1e-6).all() and (g > -1).all()


def test_box_conversions_and_area():
    b = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    assert torch.allclose(cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    x = torch.rand(7, 4)
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(x)), x, atol=1e-6)
    assert box_area(torch.tensor([[1.0, 2.0, 4.0, 3.0]])).item() == pytest.approx(3.0)


def test_sine_positions_are_distinct_per_cell():
    pos = sine_positions(4, 8, 64)
    assert pos.shape == (32, 64)
    assert torch.cdist(pos, pos).add(torch.eye(32) * 1e3).min() > 0.1  # no two cells share a position


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------
def brute_force(cost: torch.Tensor) -> tuple[float, list[tuple[int, int]]]:
    """Minimum over every injective target -> query map of the summed cost."""
    Q, n = cost.shape
    best = min(itertools.permutations(range(Q), n), key=lambda p: sum(cost[p[j], j].item() for j in range(n)))
    return sum(cost[best[j], j].item() for j in range(n)), sorted((best[j], j) for j in range(n))


@pytest.mark.parametrize("Q,n", [(3, 3), (5, 2), (4, 1), (6, 4), (4, 0)])
def test_linear_assignment_equals_brute_force(Q, n):
    g = torch.Generator().manual_seed(Q * 10 + n)
    for _ in range(5):
        cost = torch.randn(Q, n, generator=g, dtype=torch.float64)
        rows, cols = linear_assignment(cost)
        assert len(rows) == len(cols) == n
        total, pairs = brute_force(cost)
        assert cost[rows, cols].sum().item() == pytest.approx(total)
        assert sorted(zip(rows.tolist(), cols.tolist())) == pairs


def test_hungarian_match_minimizes_detr_cost():
    g = torch.Generator().manual_seed(0)
    B, Q = 3, 5
    logits = torch.randn(B, Q, 2, generator=g)
    boxes = torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25
    targets = [torch.zeros(0, 4), torch.rand(2, 4, generator=g) * 0.4 + 0.3, torch.rand(Q, 4, generator=g) * 0.4 + 0.3]
    matches = hungarian_match(logits, boxes, targets, 1.0, 5.0, 2.0)
    for lg, bx, t, (qi, ti) in zip(logits, boxes, targets, matches):
        cost = match_cost(lg, bx, t, 1.0, 5.0, 2.0)
        assert cost.shape == (Q, len(t)) and len(qi) == len(t)
        total, pairs = brute_force(cost)
        assert sorted(zip(qi.tolist(), ti.tolist())) == pairs
        if len(t):  # the cost of one entry, by hand
            p = lg.softmax(-1)[0, 0]  # query 0 holds an object
            giou = generalized_box_iou(cxcywh_to_xyxy(bx[:1]), cxcywh_to_xyxy(t[:1]))[0, 0]
            want = -p + 5 * (bx[0] - t[0]).abs().sum() - 2 * giou
            assert cost[0, 0].item() == pytest.approx(want.item(), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Head: shapes, loss, gradients
# ----------------------------------------------------------------------------------------------
def test_forward_shapes_and_predict():
    torch.manual_seed(0)
    head = tiny_head(n_layers=3)
    out = head(torch.randn(2, 4, D), torch.randn(2, 16, D))
    assert isinstance(out, DetectionOutput)
    assert out.boxes.shape == (3, 2, 8, 4) and out.logits.shape == (3, 2, 8, 2)
    assert (out.boxes > 0).all() and (out.boxes < 1).all()
    # another grid, passed per call
    out8 = head(torch.randn(2, 4, D), torch.randn(2, 64, D), grid=(8, 8))
    assert out8.boxes.shape == (3, 2, 8, 4)
    preds = head.predict(out, threshold=0.0)
    assert len(preds) == 2 and all(len(p) == 8 for p in preds)
    for p in preds:
        scores = [s for _, s in p]
        assert scores == sorted(scores, reverse=True)
        for (x0, y0, x1, y1), _ in p:
            assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
    cut = float(np.median([s for p in preds for _, s in p]))
    assert all(s >= cut for p in head.predict(out, threshold=cut) for _, s in p)


def test_context_mask_hides_padding():
    torch.manual_seed(0)
    head = tiny_head().eval()
    q, ctx = torch.randn(1, 4, D), torch.randn(1, 16, D)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, 10:] = False
    changed = ctx.clone()
    changed[0, 10:] = 100.0
    a, b = head(q, ctx, mask), head(q, changed, mask)
    assert torch.allclose(a.boxes, b.boxes, atol=1e-5) and torch.allclose(a.logits, b.logits, atol=1e-5)
    assert not torch.allclose(a.boxes, head(q, changed).boxes, atol=1e-5)


def test_loss_sends_gradients_into_query_and_context_states():
    torch.manual_seed(0)
    head = tiny_head()
    q = torch.randn(4, 4, D, requires_grad=True)
    ctx = torch.randn(4, 16, D, requires_grad=True)
    losses = head.loss(head(q, ctx), four_targets())
    assert set(losses) == {"det_ce", "det_l1", "det_giou"}
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_loss_without_any_target_teaches_no_object_only():
    torch.manual_seed(0)
    head = tiny_head()
    q = torch.randn(2, 4, D, requires_grad=True)
    out = head(q, torch.randn(2, 16, D))
    losses = head.loss(out, [torch.zeros(0, 4), []])
    assert losses["det_l1"].item() == 0 and losses["det_giou"].item() == 0 and losses["det_ce"] > 0
    sum(losses.values()).backward()
    assert q.grad.abs().sum() > 0  # the no-object cross-entropy alone still trains the decoder


def test_aux_loss_adds_every_layer():
    torch.manual_seed(0)
    head = tiny_head(n_layers=3)
    out = head(torch.randn(4, 4, D), torch.randn(4, 16, D))
    last_only = DetectionOutput(out.boxes[-1:], out.logits[-1:])
    full, last = head.loss(out, four_targets()), head.loss(last_only, four_targets())
    head.cfg.aux_loss = False
    no_aux = head.loss(out, four_targets())
    for k in full:
        assert no_aux[k].item() == pytest.approx(last[k].item())
        assert full[k].item() > last[k].item()


def test_tiny_head_overfits_four_images():
    """~200 Adam steps on fixed random states: every box found, nothing on the empty image (AP@0.5 = 1)."""
    torch.manual_seed(0)
    head = tiny_head()
    q, ctx = torch.randn(4, 4, D), torch.randn(4, 16, D)
    targets = four_targets()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(200):
        loss = sum(head.loss(head(q, ctx), targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        out = head(q, ctx)
    ap = coco_ap(head.predict(out, threshold=0.0), as_xyxy_lists(targets), image_size=32)
    assert ap["ap50"] == 1.0, ap
    assert ap["n_images"] == 4 and ap["n_gt"] == 6


# ----------------------------------------------------------------------------------------------
# COCO AP
# ----------------------------------------------------------------------------------------------
def random_scenes(n: int, seed: int) -> list[list[tuple]]:
    """n pairs of 0-3 boxes (xyxy in [0, 1], sides 0.1-0.3); about a quarter empty."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        boxes = []
        for _ in range(rng.integers(0, 4)):
            w, h = rng.uniform(0.1, 0.3, 2)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            boxes.append((x, y, x + w, y + h))
        scenes.append(boxes)
    return scenes


def test_coco_ap_perfect_perturbed_and_chance():
    gt = random_scenes(60, 0)
    perfect = [[(b, 0.9) for b in boxes] for boxes in gt]
    ap = coco_ap(perfect, gt, image_size=64)
    assert ap["ap50"] == 1.0 and ap["ap"] == 1.0
    assert ap["n_images"] == 60 and ap["n_gt"] == sum(map(len, gt))

    # shifted by a fifth of their size: still IoU > 0.5 (AP@0.5 = 1), but fail the strict thresholds
    shifted = [[((x0 + 0.2 * (x1 - x0), y0, x1 + 0.2 * (x1 - x0), y1), 0.9) for x0, y0, x1, y1 in boxes]
               for boxes in gt]
    ap_shift = coco_ap(shifted, gt, image_size=64)
    assert ap_shift["ap50"] == 1.0 and ap_shift["ap"] < 0.8

    # a confident box on a pair with no ground truth is a false positive ranked first
    empty = next(i for i, boxes in enumerate(gt) if not boxes)
    with_fp = [list(p) for p in perfect]
    with_fp[empty] = [((0.1, 0.1, 0.3, 0.3), 0.99)]
    assert coco_ap(with_fp, gt, image_size=64)["ap50"] < 1.0

    chance = coco_ap(chance_predictions(gt, np.random.default_rng(0)), gt, image_size=64)
    assert chance["ap50"] < 0.3 and chance["ap"] < 0.15


def test_coco_ap_edge_cases():
    assert np.isnan(coco_ap([[((0, 0, 0.5, 0.5), 0.9)]], [[]])["ap50"])  # no ground truth: undefined
    assert coco_ap([[]], [[(0, 0, 0.5, 0.5)]])["ap"] == 0.0  # nothing predicted
    with pytest.raises(OmniError, match="2 .* pairs but ground_truth 1"):
        coco_ap([[], []], [[]])


def test_chance_predictions_keep_sizes_inside_the_image():
    gt = [[(0.1, 0.2, 0.4, 0.3)], [], [(0.0, 0.0, 1.0, 0.5), (0.5, 0.5, 0.6, 0.6)]]
    pred = chance_predictions(gt, 1)
    assert [len(p) for p in pred[::2]] == [1, 2] and len(pred[1]) in (1, 2)
    for (x0, y0, x1, y1), s in pred[0] + pred[2]:
        assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 and 0 <= s < 1
    assert pred[0][0][0][2] - pred[0][0][0][0] == pytest.approx(0.3)
    assert pred[2][0][0][0] == pytest.approx(0.0)  # a full-width box has one position


# ----------------------------------------------------------------------------------------------
# Errors a user can cause
# ----------------------------------------------------------------------------------------------
def test_bad_config_is_a_clear_error():
    with pytest.raises(OmniError, match="n_objects=0 is invalid"):
        DetectionHeadConfig(n_objects=0)
    with pytest.raises(OmniError, match="width=30 must be a multiple of 4"):
        DetectionHeadConfig(width=30)
    with pytest.raises(OmniError, match=r"max_objects=20 is invalid: expected 1..16"):
        DetectionHeadConfig(max_objects=20)
    with pytest.raises(OmniError, match="grid"):
        DetectionHeadConfig(grid=(4, 0))
    with pytest.raises(OmniError, match="n_queries=0 is invalid"):
        DetectionHeadConfig(n_queries=0)
    with pytest.raises(OmniError, match="the decoder's hidden size"):
        DetectionHead(0)


def test_bad_inputs_are_clear_errors():
    head = tiny_head()
    q = torch.randn(2, 4, D)
    with pytest.raises(OmniError, match=r"N=15 image tokens but grid 4x4 has 16"):
        head(q, torch.randn(2, 15, D))
    with pytest.raises(OmniError, match=r"N=16 image tokens but grid 8x8 has 64"):
        head(q, torch.randn(2, 16, D), grid=(8, 8))
    with pytest.raises(OmniError, match="needs the image-token grid"):
        tiny_head(grid=None)(q, torch.randn(2, 16, D))
    with pytest.raises(OmniError, match=r"D=32"):
        head(torch.randn(2, 4, 16), torch.randn(2, 16, D))
    out = head(q, torch.randn(2, 16, D))
    with pytest.raises(OmniError, match=r"targets\[1\] has values outside \[0, 1\]"):
        head.loss(out, [torch.zeros(0, 4), torch.tensor([[0.5, 0.5, 1.2, 0.2]])])
    with pytest.raises(OmniError, match=r"list of 2 box tensors"):
        head.loss(out, [torch.zeros(0, 4)])
    with pytest.raises(OmniError, match=r"holds 9 boxes, more than max_objects=8"):
        head.loss(out, [torch.full((9, 4), 0.5), torch.zeros(0, 4)])
    with pytest.raises(OmniError, match=r"must be \[n, 4\]"):
        head.loss(out, [torch.zeros(3), torch.zeros(0, 4)])
