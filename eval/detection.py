"""COCO-protocol average precision of the ``<det>`` head, and the chance row a demo prints beside it.

Each (image, request) pair ("find every red circle" on one scene) is one COCO image with one
category: its ground truth is the boxes the request asks for (none when the asked pair is absent)
and its predictions are the head's boxes with scores (:meth:`omni.decoders.detection.DetectionHead.predict`).
A pair without ground truth is a COCO image without annotations: every box predicted there is a
false positive and lowers precision, so a head that ignores the request (and finds the red circle
for "find every blue square") is penalized.

AP is pycocotools' (Lin et al., "Microsoft COCO: Common Objects in Context", 2014,
https://arxiv.org/abs/1405.0312; the evaluator of DETR and most detection papers): precision
interpolated at 101 recall points, at most 100 detections per image, AP@0.5 and AP averaged over
IoU thresholds 0.50:0.05:0.95. Boxes are given as (x0, y0, x1, y1) fractions of the image side and
scaled to pixels by ``image_size`` (only COCO's small/medium/large split, unused here, depends on it).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

from omni.errors import OmniError

Box = Sequence[float]
"""(x0, y0, x1, y1) in [0, 1] of the image side."""


def _pixels(box, W: int, H: int, where: str) -> list[float]:
    """xyxy in [0, 1] -> COCO's [x, y, width, height] in pixels."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.isfinite(b).all():
        raise OmniError(f"{where} must be a box (x0, y0, x1, y1), got {box!r}")
    if b[2] < b[0] or b[3] < b[1]:
        raise OmniError(f"{where}={tuple(b)} is not (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    return [b[0] * W, b[1] * H, (b[2] - b[0]) * W, (b[3] - b[1]) * H]


def coco_ap(predictions: Sequence[Sequence[tuple[Box, float]]], ground_truth: Sequence[Sequence[Box]],
            image_size: int | tuple[int, int] = 32, categories: Sequence[int] | None = None) -> dict:
    """COCO AP of per-(image, request) predictions against ground truth.

    ``predictions[i]``: [(box xyxy in [0, 1], score), ...] of pair i (any order);
    ``ground_truth[i]``: [box xyxy in [0, 1], ...] of pair i, possibly empty.
    ``image_size``: pixels, H = W or (H, W). ``categories[i]``: the category of pair i (default: one
    category for all, so AP pools every pair's detections into one precision-recall curve; give each
    request kind its own to get their mean instead).

    Returns {"ap50": AP@0.5, "ap": AP@[.5:.95], "n_images": pairs, "n_gt": ground-truth boxes}; the
    APs are nan when there is no ground-truth box at all (precision is then undefined).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truth):
        raise OmniError(f"predictions cover {len(predictions)} (image, query) pairs but ground_truth {len(ground_truth)}")
    H, W = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if H < 1 or W < 1:
        raise OmniError(f"image_size={image_size!r} is invalid: expected positive pixels, H or (H, W)")
    if categories is None:
        categories = [1] * len(ground_truth)
    elif len(categories) != len(ground_truth):
        raise OmniError(f"categories name {len(categories)} pairs but ground_truth holds {len(ground_truth)}")

    images = [{"id": i + 1, "width": W, "height": H} for i in range(len(ground_truth))]
    cats = [{"id": int(c)} for c in sorted(set(int(c) for c in categories))]
    gts, dets = [], []
    for i, (boxes, cat) in enumerate(zip(ground_truth, categories)):
        for j, box in enumerate(boxes):
            b = _pixels(box, W, H, f"ground_truth[{i}][{j}]")
            gts.append({"id": len(gts) + 1, "image_id": i + 1, "category_id": int(cat), "bbox": b,
                        "area": b[2] * b[3], "iscrowd": 0})
    for i, (pairs, cat) in enumerate(zip(predictions, categories)):
        for j, item in enumerate(pairs):
            try:
                box, score = item
                score = float(score)
            except (TypeError, ValueError):
                raise OmniError(f"predictions[{i}][{j}] must be (box, score), got {item!r}") from None
            b = _pixels(box, W, H, f"predictions[{i}][{j}] box")
            dets.append({"id": len(dets) + 1, "image_id": i + 1, "category_id": int(cat), "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0, "score": score})
    result = {"ap50": float("nan"), "ap": float("nan"), "n_images": len(ground_truth), "n_gt": len(gts)}
    if not gts:
        return result
    if not dets:  # pycocotools' loadRes cannot take an empty list; nothing found is AP 0
        return {**result, "ap50": 0.0, "ap": 0.0}

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": cats, "annotations": gts}
        coco_dt.dataset = {"images": images, "categories": cats, "annotations": dets}
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0]: AP@[.5:.95], stats[1]: AP@0.5 (area all, 100 detections); -1 where undefined
    ap, ap50 = (float(v) if v >= 0 else float("nan") for v in ev.stats[:2])
    return {**result, "ap50": ap50, "ap": ap}


def chance_predictions(ground_truth: Sequence[Sequence[Box]], rng: np.random.Generator | int | None = None,
                       ) -> list[list[tuple[tuple[float, float, float, float], float]]]:
    """The chance row: per pair, boxes of the ground-truth sizes at uniformly random positions, random scores.

    A pair with ground truth gets one random box per true box, of that box's width and height (so
    chance even knows how many objects there are and how big); a pair without gets the boxes of a
    randomly drawn pair that has some (chance does not know the asked pair is absent). Positions
    keep the box inside the image; scores are uniform in [0, 1).
    """
    rng = np.random.default_rng(rng)
    sizes = [np.array([(b[2] - b[0], b[3] - b[1]) for b in boxes], dtype=np.float64).reshape(-1, 2)
             for boxes in ground_truth]
    donors = [s for s in sizes if len(s)]
    out = []
    for s in sizes:
        if not len(s):
            s = donors[rng.integers(len(donors))] if donors else s
        x0 = rng.uniform(0, 1, len(s)) * (1 - s[:, 0])  # box inside [0, 1]
        y0 = rng.uniform(0, 1, len(s)) * (1 - s[:, 1])
        scores = rng.uniform(0, 1, len(s))
        out.append([((float(a), float(b), float(a + w), float(b + h)), float(sc))
                    for a, b, (w, h), sc in zip(x0, y0, s, scores)])
    return out
