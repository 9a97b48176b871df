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


# ----------------------------------------------------------------------------------------------
# The detection suite on the toy world: `omni eval detection --checkpoint DIR`
# ----------------------------------------------------------------------------------------------
REQUESTS = ("the shapes", "present pair", "absent pair")
"""Per scene: "find the shapes" (every object), "find every C S" of a pair it shows, and of one it lacks."""


def requests_of(scene, rng: np.random.Generator, novel_pairs) -> list[tuple[str, str, list]]:
    """(kind, request, ground-truth boxes) of one scene's three requests (:data:`REQUESTS`)."""
    from omni.toy.shapes import COLORS, SHAPES

    size = scene.image.shape[0]
    box = lambda o: tuple(v / size for v in o.box)  # noqa: E731
    present = sorted(set(scene.pairs))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c, s) not in novel_pairs]
    c, s = present[rng.integers(len(present))]
    a = absent[rng.integers(len(absent))]
    return [("the shapes", "find the shapes", [box(o) for o in scene.objects]),
            ("present pair", f"find every {c} {s}", [box(o) for o in scene.objects if (o.color, o.shape) == (c, s)]),
            ("absent pair", f"find every {a[0]} {a[1]}", [])]


def padded_batch(model, tok, rows: list):
    """Token rows (1-D tensors) right-padded for one teacher-forced pass: (ids [B, L], positions) on
    the model's device; causal rows never see the padding, and an M-RoPE model gets each row's 3-D
    positions ([3, B, L]; None for the other kinds, which derive them)."""
    import torch

    from omni.rope import batch_positions, uses_mrope

    device = next(model.parameters()).device
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tok.vocab.special("<pad>"), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = r
    positions = batch_positions(rows, tok.vocab, L).to(device) if uses_mrope(model) else None
    return ids.to(device), positions


def routed_forward(model, tok, rows: list):
    """One teacher-forced pass over routed token rows (each a 1-D tensor, ``<det>``/``<gen>`` with their
    slots): the rows padded (:func:`padded_batch`), the heads' queries spliced in. Returns (final
    hidden states [B, L, D] float32, ids [B, L], routes)."""
    heads = model.heads
    ids, positions = padded_batch(model, tok, rows)
    routes = heads.find(ids)
    hidden = model(ids, splice=heads.queries.splicer(routes), position_ids=positions, return_hidden=True).hidden
    return hidden.float(), ids, routes


def evaluate_detection(model, tok, scenes, novel_pairs=(), batch_size: int = 32, seed: int = 0,
                       examples: list | None = None) -> dict:
    """COCO AP of ``model.heads``' detection head on ``scenes`` (teacher-forced: the request, the scene's
    image, then ``<det>`` and its slots, as the training documents are), by request kind, pooled, and
    the chance row of each (:func:`chance_predictions`); plus the share of absent-pair requests that
    got a box scoring above 0.5. ``examples``, if given, receives every request as ``(kind, request,
    scene, [(box, score), ...])`` in scene order (to show them)."""
    import torch

    with torch.inference_mode():
        return _evaluate_detection(model, tok, scenes, novel_pairs, batch_size, seed, examples)


def _evaluate_detection(model, tok, scenes, novel_pairs, batch_size: int, seed: int, examples) -> dict:
    import time

    from omni.document import Detect, Document, Image, Text

    heads = getattr(model, "heads", None)
    if heads is None or "det" not in heads.heads:
        raise OmniError("this checkpoint has no detection head (train with heads.det.enabled=true)")
    rng = np.random.default_rng(seed)
    items = [(kind, req, gt, sc) for sc in scenes for kind, req, gt in requests_of(sc, rng, novel_pairs)]
    k = heads.queries.n_queries["<det>"]
    preds = []
    t0 = time.perf_counter()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        rows = [tok.encode(Document([Text(req), Image(sc.image), Detect()]), slots={"<det>": k})
                for _, req, _, sc in chunk]
        hidden, ids, routes = routed_forward(model, tok, rows)
        preds += heads.predict(hidden, ids, routes, threshold=0.0)
    seconds = time.perf_counter() - t0
    if examples is not None:
        examples += [(kind, req, sc, p) for (kind, req, _, sc), p in zip(items, preds)]
    size = scenes[0].image.shape[0] if scenes else 32
    out: dict = {"n_scenes": len(scenes), "seconds_per_request": seconds / max(len(items), 1)}
    chance = chance_predictions([gt for _, _, gt, _ in items], rng)
    groups = {"the_shapes": ["the shapes"], "every_pair": ["present pair", "absent pair"],
              "present_pair": ["present pair"], "pooled": list(REQUESTS)}
    for name, kinds in groups.items():
        idx = [j for j, it in enumerate(items) if it[0] in kinds]
        m = coco_ap([preds[j] for j in idx], [items[j][2] for j in idx], size)
        c = coco_ap([chance[j] for j in idx], [items[j][2] for j in idx], size)
        out[name] = {"ap50": m["ap50"], "ap": m["ap"], "chance_ap50": c["ap50"], "chance_ap": c["ap"],
                     "requests": len(idx), "boxes": m["n_gt"]}
    absent = [preds[j] for j, it in enumerate(items) if it[0] == "absent pair"]
    out["absent_with_a_box_over_0.5"] = float(np.mean([any(s > 0.5 for _, s in p) for p in absent])) if absent else 0.0
    return out


def detection_suite(checkpoint, data, cfg, out=None) -> dict:
    """`omni eval detection --checkpoint DIR`: :func:`evaluate_detection` on ``cfg.detection.n_scenes``
    scenes of the toy world's ``cfg.detection.split`` (disjoint from training by content), drawn at the
    size of the checkpoint's image tokenizer."""
    from omni.checkpoint import load
    from omni.toy.shapes import NOVEL_PAIRS, scenes

    if data:
        raise OmniError("the detection suite makes its scenes from the toy world; it takes no --data")
    c = cfg.detection
    model, tok = load(checkpoint, device="cpu")
    if tok.image is None:
        raise OmniError(f"{checkpoint}: its bundle has no image tokenizer to read the scenes")
    size = tok.image.config.image_size
    sc = scenes(c.n_scenes, c.split, c.seed, size=size, grid=c.grid)
    return evaluate_detection(model, tok, sc, NOVEL_PAIRS, c.batch_size, c.seed)
