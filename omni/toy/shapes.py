"""A toy world for ``omni demo``: scenes of one to three colored shapes, made on the fly from a seed.

A scene is a white ``size`` x ``size`` canvas (64 px by default) with one to three objects, each a
:data:`SHAPES` shape in one :data:`COLORS` color (one RGB per name), drawn without anti-aliasing by
Pillow's ``ImageDraw`` so every object pixel has its exact color. Sizes and positions vary; objects
never overlap (rejection sampling keeps a gap of :data:`GAP` pixels between their boxes). Each
scene carries

* ``image``: uint8 [H,W,3];
* ``objects``: ``(shape, color, box)`` with ``box = (x0, y0, x1, y1)`` the tight box of the drawn
  pixels, end-exclusive (``x0 <= x < x1``), ordered left to right by box center (``order="reading"``:
  by top edge, then left edge, the order a raster scan meets them);
* ``caption``: simple English naming every object in that order, "a red circle",
  "a red circle and a blue square", "a green triangle, a red circle and an orange square";
* ``speech()``: the caption spoken by :func:`omni.toy.speech.synthesize`, with voice, speed and
  pitch drawn from the scene seed (same seed, same wave; the synthesizer caches).

Same ``(seed, size, ...)``, same scene, in any process. Splits are disjoint by **content**, not
by seed: :func:`split_of` reads a scene's canonical content (:func:`scene_key`: its sorted
``(color, shape, left, top, side)`` objects), so a held-out scene never has the pixels of a
training scene, and a scene's split never depends on how many were asked for. ``validation`` and
``test`` hold new layouts and combinations of the 16 training objects (a one-object scene's
caption, "a red circle", still occurs in training: six colors and three shapes make only 18
objects). The compositional splits hold the scenes with a :data:`NOVEL_PAIRS` pair ("a purple
triangle"), which no training image, caption, transcript or story shows.

:func:`write_shards` writes WebDataset shards in the format of docs/data.md, kinds selectable:

* ``caption``: ``KEY.png`` + ``KEY.txt`` (the caption), an image-text pair;
* ``speech``: ``KEY.wav`` + ``KEY.txt`` (the spoken caption and its transcript);
* ``story``: ``KEY.json`` + members, "draw a red circle, then a blue square." followed by one
  image per object, each alone on the canvas at its place in the scene;
* ``spoken``: ``KEY.json`` + members, the spoken caption followed by the scene's image (speech to
  image);
* ``detect``: ``KEY.json`` + ``KEY.0.png``, a request, the scene's image and a ``det`` segment with
  the boxes that answer it (:func:`detection_request`): "find the shapes" (every object) or "find
  every red circle" (the objects of that pair; a pair the scene lacks, answered by no box, a third
  of the time);
* ``generate``: ``KEY.json`` + ``KEY.0.png``, the caption and a ``gen`` segment naming the scene's
  image (the diffusion head's target).

For scoring generated text, :func:`parse_caption` reads ``(color, shape)`` pairs back out of a
caption and :func:`caption_accuracy` compares predicted captions with the truth.

``python -m omni.toy.shapes OUT_DIR --scenes N`` writes shards of every split and a few PNGs
(``OUT_DIR/preview/``) to look at.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni.errors import OmniError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
"""Color names and the one RGB each is drawn with."""
SHAPES = ("circle", "square", "triangle")
"""Shape names."""
KINDS = ("caption", "speech", "story", "spoken", "detect", "generate")
"""Sample kinds :func:`write_shards` can write (see the module docstring)."""
ORDERS = ("left_to_right", "reading")
"""Orders objects (and so captions and stories) can come in: by box center left to right, or in
reading order (top edge, then left edge: the order a raster-scan image model draws them in)."""
MIN_CANVAS = 32
"""Smallest canvas side (pixels): below it three shapes large enough to tell apart do not fit."""
MAX_OBJECTS = 3
"""Most objects in a scene."""
GAP = 2
"""Least empty pixels between two objects' boxes."""
BACKGROUND = (255, 255, 255)
"""Canvas color (white)."""

@dataclass(frozen=True)
class Obj:
    """One object of a scene."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    """Tight box of its drawn pixels, ``(x0, y0, x1, y1)``, end-exclusive."""

    @property
    def phrase(self) -> str:
        """'a red circle' / 'an orange square'."""
        return f"{'an' if self.color[0] in 'aeiou' else 'a'} {self.color} {self.shape}"


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene (see the module docstring)."""

    seed: int
    image: np.ndarray
    """uint8 [H,W,3]."""
    objects: tuple[Obj, ...]
    """Left to right by box center, or in reading order (see :func:`render`)."""
    voice: str
    """espeak-ng voice of :meth:`speech` ("en-us+f3")."""
    speed: int
    """Words per minute of :meth:`speech`."""
    pitch: int
    """Pitch (0..100) of :meth:`speech`."""
    layout: tuple[tuple[int, int, int], ...] = field(default=(), repr=False)
    """Per object, the ``(left, top, side)`` it was drawn from (redraws it alone)."""

    @property
    def caption(self) -> str:
        return caption_of(self.objects)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """``[(color, shape)]`` of the objects, in their order."""
        return [(o.color, o.shape) for o in self.objects]

    def speech(self) -> tuple[np.ndarray, int]:
        """The caption spoken: (float32 wave [T], 22050); read-only, cached by the synthesizer."""
        from omni.toy.speech import synthesize

        return synthesize(self.caption + ".", self.voice, self.speed, self.pitch)

    def alone(self, i: int) -> np.ndarray:
        """Object ``i`` alone on an empty canvas at its place in the scene: uint8 [H,W,3]."""
        o = self.objects[i]
        img, _ = _draw([(o.shape, o.color, self.layout[i])], self.image.shape[0])
        return img


def caption_of(objects: Sequence[Obj]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c' (objects in the given order)."""
    phrases = [o.phrase for o in objects]
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _check_names(colors: Iterable[str] | None, shapes: Iterable[str] | None) -> tuple[list[str], list[str]]:
    colors = list(COLORS) if colors is None else list(colors)
    shapes = list(SHAPES) if shapes is None else list(shapes)
    for c in colors:
        if c not in COLORS:
            raise OmniError(f"unknown color {c!r}; choose from {', '.join(COLORS)}")
    for s in shapes:
        if s not in SHAPES:
            raise OmniError(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    if not colors or not shapes:
        raise OmniError("a scene needs at least one color and one shape to choose from")
    return colors, shapes


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OmniError(f"seed {seed!r} is invalid: expected an integer >= 0")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < MIN_CANVAS:
        raise OmniError(f"canvas size {size!r} is too small: expected an integer >= {MIN_CANVAS} pixels")


def _check_grid(grid: int, size: int) -> None:
    lo, hi = _size_range(size)
    if not isinstance(grid, (int, np.integer)) or grid < 1 or hi // grid < -(-lo // grid):
        raise OmniError(f"grid={grid!r} is invalid for a {size}px canvas: expected an integer >= 1 with a "
                        f"multiple of it between the object sides {lo} and {hi} pixels")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise OmniError(f"order={order!r} is invalid: choose from {', '.join(ORDERS)}")


def _size_range(size: int) -> tuple[int, int]:
    """Object side lengths (pixels) drawn uniformly from [lo, hi]: about 1/6 to 3/8 of the canvas."""
    return max(8, size // 6), max(9, (3 * size) // 8)


def _draw_one(draw, shape: str, rgb, left: int, top: int, side: int) -> None:
    """Draw one shape whose pixels fill exactly the box [left, left+side) x [top, top+side)."""
    x1, y1 = left + side - 1, top + side - 1  # Pillow's boxes and polygons are end-inclusive
    if shape == "circle":
        draw.ellipse([left, top, x1, y1], fill=rgb)
    elif shape == "square":
        draw.rectangle([left, top, x1, y1], fill=rgb)
    else:  # triangle, apex up; an even side has no middle pixel, so the apex is two pixels wide
        draw.polygon([(left, y1), (x1, y1), ((left + x1) // 2 + (side % 2 == 0), top), ((left + x1) // 2, top)],
                     fill=rgb)


def _draw(items: Sequence[tuple[str, str, tuple[int, int, int]]], size: int) -> tuple[np.ndarray, list]:
    """Render ``(shape, color, (left, top, side))`` items; returns the image and each item's tight box."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    boxes = []
    for shape, color, (left, top, side) in items:
        # each shape on its own mask too, to measure the box of the pixels it really drew
        mask = Image.new("1", (size, size), 0)
        _draw_one(ImageDraw.Draw(mask), shape, 1, left, top, side)
        x0, y0, x1, y1 = mask.getbbox()
        boxes.append((x0, y0, x1, y1))
        _draw_one(draw, shape, COLORS[color], left, top, side)
    return np.asarray(im, dtype=np.uint8).copy(), boxes


def render(objects: Sequence[tuple[str, str]], seed: int = 0, size: int = 64, grid: int = 1,
           order: str = "left_to_right") -> Scene:
    """A scene of the given ``(color, shape)`` objects at random sizes and positions.

    Objects come out in ``order`` (their given order is not kept): 'left_to_right' by box center,
    or 'reading' by top edge then left edge, the order in which a model generating image codes
    row by row starts them (captions that follow it tell that model what comes next). ``grid``: sides and
    positions are multiples of this many pixels (1: any pixel). ``omni demo`` uses its image
    tokenizer's patch size, so every object is drawn as one fixed pattern of whole patches.
    """
    _check_size(size)
    _check_seed(seed)
    _check_grid(grid, size)
    _check_order(order)
    objects = list(objects)
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise OmniError(f"a scene has 1 to {MAX_OBJECTS} objects, asked for {len(objects)}")
    _check_names([c for c, _ in objects], [s for _, s in objects])
    rng = np.random.default_rng([int(seed), size, 1])
    lo, hi = _size_range(size)
    lo, hi = -(-lo // grid), hi // grid  # in grid units
    for _ in range(1000):
        placed: list[tuple[int, int, int]] = []
        for _obj in objects:
            side = grid * int(rng.integers(lo, hi + 1))
            left, top = (grid * int(v) for v in rng.integers(0, (size - side) // grid + 1, size=2))
            if any(left < pl + ps + GAP and pl < left + side + GAP and top < pt + ps + GAP and pt < top + side + GAP
                   for pl, pt, ps in placed):
                break  # overlaps (or touches) an object placed before: draw the whole layout again
            placed.append((left, top, side))
        else:
            break
    else:  # pragma: no cover - 3 objects of at most 3/8 of the canvas always fit quickly
        raise OmniError(f"could not place {len(objects)} objects on a {size}px canvas")
    # it = (shape, color, (left, top, side))
    key = ((lambda it: (2 * it[2][0] + it[2][2], it[2][1])) if order == "left_to_right"
           else (lambda it: (it[2][1], it[2][0])))
    items = sorted(((s, c, p) for (c, s), p in zip(objects, placed)), key=key)
    image, boxes = _draw(items, size)
    from omni.toy.speech import VARIANTS, VOICES

    voice_rng = np.random.default_rng([int(seed), 2])
    voice = f"{VOICES[voice_rng.integers(len(VOICES))]}+{VARIANTS[voice_rng.integers(len(VARIANTS))]}"
    return Scene(seed=int(seed), image=image,
                 objects=tuple(Obj(s, c, b) for (s, c, _), b in zip(items, boxes)),
                 voice=voice, speed=int(voice_rng.integers(130, 211)), pitch=int(voice_rng.integers(25, 76)),
                 layout=tuple(p for _, _, p in items))


def scene(seed: int, n_objects: int | None = None, size: int = 64, colors: Iterable[str] | None = None,
          shapes: Iterable[str] | None = None, grid: int = 1, order: str = "left_to_right") -> Scene:
    """The scene of ``seed``: ``n_objects`` (1..3; None: drawn from the seed) random colored shapes.

    ``colors`` and ``shapes`` restrict the names drawn from (default: all of :data:`COLORS`, :data:`SHAPES`).
    Deterministic: the same arguments give the same scene.
    """
    _check_size(size)
    _check_seed(seed)
    colors, shapes = _check_names(colors, shapes)
    rng = np.random.default_rng([int(seed), size, 0])
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_OBJECTS:
        raise OmniError(f"n_objects={n_objects!r} is invalid: a scene has 1 to {MAX_OBJECTS} objects")
    objs = [(colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]) for _ in range(n)]
    return render(objs, seed=seed, size=size, grid=grid, order=order)


NOVEL_PAIRS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("green", "square"))
"""(color, shape) pairs of the compositional splits: no scene of ``train`` holds one, so a model
trained on it has seen purple and triangles, green and squares, but never these pairs together."""
SPLITS = ("train", "validation", "test", "compositional_validation", "compositional_test")
"""Scene splits, disjoint by content (:func:`split_of`)."""
HELDOUT_FRACTION = 0.1
"""Share of the scenes without a novel pair that go to ``validation``; as many go to ``test``."""


def scene_key(sc: Scene) -> tuple:
    """What a scene shows, canonicalized: ``(canvas side, sorted (color, shape, left, top, side) of its
    objects)``. Two scenes with the same key have the same pixels (objects never overlap), whatever
    their seeds or the order their caption names the objects in."""
    return (int(sc.image.shape[0]),
            tuple(sorted((o.color, o.shape, *p) for o, p in zip(sc.objects, sc.layout))))


def split_of(sc: Scene, novel_pairs: Sequence[tuple[str, str]] = NOVEL_PAIRS) -> str:
    """The split of a scene (:data:`SPLITS`), a function of its content alone.

    A scene holding any of ``novel_pairs`` is ``compositional_validation`` or
    ``compositional_test`` (half each); any other scene is ``validation`` or ``test``
    (:data:`HELDOUT_FRACTION` each) or ``train``, by a hash of :func:`scene_key`. So every
    held-out scene differs from every training scene in its pixels, and no training scene shows a
    novel pair.
    """
    return _split_of_key(scene_key(sc), novel_pairs)


def _split_of_key(key: tuple, novel_pairs: Sequence[tuple[str, str]]) -> str:
    h = int.from_bytes(hashlib.sha1(repr(key).encode()).digest()[:8], "big") % 10_000 / 10_000
    novel = {tuple(p) for p in novel_pairs}
    if any((color, shape) in novel for color, shape, *_ in key[1]):
        return "compositional_validation" if h < 0.5 else "compositional_test"
    return "validation" if h < HELDOUT_FRACTION else "test" if h < 2 * HELDOUT_FRACTION else "train"


def parts_split(sc: Scene, novel_pairs: Sequence[tuple[str, str]] = NOVEL_PAIRS) -> set[str]:
    """The splits of the scene's objects drawn alone (:meth:`Scene.alone`, a story's pictures): each
    is a one-object scene with a split of its own."""
    size, objs = scene_key(sc)
    return {_split_of_key((size, (o,)), novel_pairs) for o in objs}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise OmniError(f"split={split!r} is invalid: choose from {', '.join(SPLITS)}")


def scenes(n: int, split: str = "train", seed: int = 0, novel_pairs: Sequence[tuple[str, str]] = NOVEL_PAIRS,
           unique: bool | None = None, parts: bool = False, **kwargs) -> list[Scene]:
    """The first ``n`` scenes of ``split`` in the stream of ``seed`` (keyword arguments go to :func:`scene`).

    The stream walks the scene seeds ``seed * 2**32 + k`` for k = 0, 1, ... and keeps the scenes
    whose :func:`split_of` is ``split``; the same arguments give the same scenes, and a scene's
    split never depends on ``n``. ``unique`` (default: for every split but ``train``) also skips a
    scene whose content (:func:`scene_key`) came earlier in the stream, so an evaluation set counts
    each scene once; training streams repeat one-object scenes (there are a few hundred).
    ``parts``: also keep only scenes whose objects drawn alone are of ``split`` too
    (:func:`parts_split`), so a story's one-object pictures never show a held-out scene.
    """
    _check_split(split)
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise OmniError(f"number of scenes must be an integer >= 0, got {n!r}")
    unique = split != "train" if unique is None else unique
    out: list[Scene] = []
    seen: set = set()
    for k in itertools.count():
        if len(out) == n:
            return out
        if k > 1000 * (n + 10):
            raise OmniError(f"found only {len(out)} of {n} distinct {split} scenes in the stream of seed {seed}; "
                            "ask for fewer, or more objects per scene")
        sc = scene(int(seed) * 2**32 + k, **kwargs)
        if split_of(sc, novel_pairs) != split or (parts and parts_split(sc, novel_pairs) != {split}):
            continue
        if unique:
            key = scene_key(sc)
            if key in seen:
                continue
            seen.add(key)
        out.append(sc)
    return out  # pragma: no cover - the loop returns


def scene_seeds(n: int, split: str = "train", seed: int = 0, **kwargs) -> list[int]:
    """The seeds of :func:`scenes` (same arguments): ``scene(s, **kwargs)`` redraws each."""
    return [sc.seed for sc in scenes(n, split, seed, **kwargs)]


# ---------------------------------------------------------------------------------------------
# Reading captions back
# ---------------------------------------------------------------------------------------------
_PAIR = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b", re.IGNORECASE)


def parse_caption(text: str) -> list[tuple[str, str]]:
    """The ``(color, shape)`` pairs a caption names, in order: a color word directly followed by a
    shape word (case-insensitive, plural 's' allowed). Anything else is ignored."""
    return [(c.lower(), s.lower()) for c, s in _PAIR.findall(text or "")]


def _truth_pairs(t) -> list[tuple[str, str]]:
    if isinstance(t, Scene):
        return t.pairs
    if isinstance(t, str):
        return parse_caption(t)
    return [(c, s) for c, s in t]


def _attribute_score(pred: list[tuple[str, str]], true: list[tuple[str, str]]) -> float:
    """Right colors and shapes of the best one-to-one matching, over 2 * max(len(pred), len(true))."""
    slots = max(len(pred), len(true))
    if slots == 0:
        return 1.0
    pred = pred[:2 * MAX_OBJECTS]  # a runaway caption: its extra objects score zero anyway
    best = 0
    for perm in itertools.permutations(range(len(pred)), min(len(pred), len(true))):
        best = max(best, sum((pred[i][0] == c) + (pred[i][1] == s) for i, (c, s) in zip(perm, true)))
    return best / (2 * slots)


def caption_accuracy(predicted: Sequence[str], truth: Sequence) -> dict[str, float]:
    """Compare predicted captions with the truth, scene by scene; order of objects never matters.

    ``truth`` items are Scenes, captions, or lists of ``(color, shape)``. Returns shares over scenes:

    * ``exact``: the multiset of (color, shape) pairs parsed from the prediction equals the truth's;
    * ``count``: the prediction names as many objects as there are;
    * ``colors`` / ``shapes``: the multiset of colors (of shapes) alone is right;
    * ``precision`` / ``recall``: of all predicted (true) pairs, the share matched by a true
      (predicted) one, multiset intersection summed over scenes (1.0 when there are none);
    * ``attributes``: attribute accuracy. Predicted objects are matched one to one with true ones
      (the matching that scores best, so order never matters); each matched object scores one
      for its right color and one for its right shape, over ``2 * max(n_pred, n_true)`` per scene
      (a missing or extra object scores zero), averaged over scenes. A one-object caption with
      uniformly random words scores (1/6 + 1/3) / 2 = 0.25.
    """
    if len(predicted) != len(truth):
        raise OmniError(f"{len(predicted)} predicted captions for {len(truth)} scenes")
    n = max(1, len(truth))
    exact = count = colors = shapes = matched = n_pred = n_true = attributes = 0
    for p, t in zip(predicted, truth):
        pp, tp = parse_caption(p), _truth_pairs(t)
        attributes += _attribute_score(pp, tp)
        cp, ct = collections.Counter(pp), collections.Counter(tp)
        exact += cp == ct
        count += len(pp) == len(tp)
        colors += collections.Counter(c for c, _ in pp) == collections.Counter(c for c, _ in tp)
        shapes += collections.Counter(s for _, s in pp) == collections.Counter(s for _, s in tp)
        matched += sum((cp & ct).values())
        n_pred, n_true = n_pred + len(pp), n_true + len(tp)
    return {"exact": exact / n, "count": count / n, "colors": colors / n, "shapes": shapes / n,
            "precision": matched / n_pred if n_pred else 1.0, "recall": matched / n_true if n_true else 1.0,
            "attributes": attributes / n}


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------
def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _wav(sc: Scene, sample_rate: int) -> bytes:
    import soundfile as sf

    wave, sr = sc.speech()
    if sample_rate != sr:
        import soxr

        wave = soxr.resample(wave, sr, sample_rate, quality="HQ")
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


DETECT_ALL = 0.4
"""Share of detection requests that ask for every object ("find the shapes")."""
DETECT_ABSENT = 1 / 3
"""Share of "find every <color> <shape>" requests whose pair the scene lacks (the answer: no box)."""


def detection_request(sc: Scene, key: str,
                      novel_pairs: Sequence[tuple[str, str]] = NOVEL_PAIRS) -> tuple[str, str, list[tuple]]:
    """(request, phrase, boxes) of a scene's detection sample, drawn from a hash of ``key``.

    ``boxes``: ``(x0, y0, x1, y1)`` as fractions of the canvas, of the objects that answer the
    request, left to right. An absent pair is never a :data:`NOVEL_PAIRS` pair, so a request names
    only pairs its split may show."""
    h = np.random.default_rng(int.from_bytes(hashlib.sha256(f"detect:{key}".encode()).digest()[:8], "little"))
    size = sc.image.shape[0]
    if h.random() < DETECT_ALL:
        chosen, phrase = list(sc.objects), "the shapes"
    else:
        present = sorted(set(sc.pairs))
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c, s) not in novel_pairs]
        color, shape = (absent[h.integers(len(absent))] if h.random() < DETECT_ABSENT
                        else present[h.integers(len(present))])
        chosen, phrase = [o for o in sc.objects if (o.color, o.shape) == (color, shape)], f"every {color} {shape}"
    boxes = [tuple(round(v / size, 6) for v in o.box) for o in chosen]
    return f"find {phrase}", phrase, boxes


def samples(sc: Scene, key: str, kinds: Sequence[str] = KINDS, sample_rate: int = 16000) -> list[dict]:
    """The WebDataset samples (``{"__key__": ..., EXT: bytes}``) of one scene, one per kind."""
    out = []
    for kind in kinds:
        k = f"{key}-{kind}"
        if kind == "caption":
            out.append({"__key__": k, "png": _png(sc.image), "txt": sc.caption.encode()})
        elif kind == "speech":
            out.append({"__key__": k, "wav": _wav(sc, sample_rate), "txt": sc.caption.encode()})
        elif kind == "story":
            steps = ", then ".join(o.phrase for o in sc.objects)
            segs: list[dict] = [{"text": f"draw {steps}."}]
            s = {"__key__": k}
            for i in range(len(sc.objects)):
                segs.append({"image": f"{i}.png"})
                s[f"{i}.png"] = _png(sc.alone(i))
            s["json"] = json.dumps({"segments": segs}).encode()
            out.append(s)
        elif kind == "spoken":
            doc = {"segments": [{"audio": "0.wav"}, {"image": "1.png"}]}
            out.append({"__key__": k, "json": json.dumps(doc).encode(), "0.wav": _wav(sc, sample_rate),
                        "1.png": _png(sc.image)})
        elif kind == "detect":
            request, phrase, boxes = detection_request(sc, key)
            # the request first: the image's tokens then attend to it (shared/notes/heads-calibration.md)
            doc = {"segments": [{"text": request, "prompt": True}, {"image": "0.png", "prompt": True},
                                {"det": {"boxes": [list(b) for b in boxes], "phrase": phrase}}]}
            out.append({"__key__": k, "json": json.dumps(doc).encode(), "0.png": _png(sc.image)})
        elif kind == "generate":
            doc = {"segments": [{"text": sc.caption}, {"gen": "0.png"}]}
            out.append({"__key__": k, "json": json.dumps(doc).encode(), "0.png": _png(sc.image)})
        else:
            raise OmniError(f"unknown sample kind {kind!r}; choose from {', '.join(KINDS)}")
    return out


def write_shards(out: str | os.PathLike, n_scenes: int, split: str = "train", seed: int = 0,
                 kinds: Sequence[str] = KINDS, scenes_per_shard: int = 1000, size: int = 64,
                 sample_rate: int = 16000, resume: bool = False, grid: int = 1,
                 order: str = "left_to_right", novel_pairs: Sequence[tuple[str, str]] = NOVEL_PAIRS) -> list[Path]:
    """Write the first ``n_scenes`` scenes of ``split`` (:func:`scenes`; with ``story`` among the
    training kinds, those whose objects alone are training scenes too) as ``out/shapes-SPLIT-000.tar`` ...

    Each scene gives one sample per kind in ``kinds`` (see :data:`KINDS`), keys
    ``SPLIT-<scene seed in hex>-KIND``. Each shard is written to a temp file and renamed, so a
    shard that exists is whole: with ``resume`` such shards are kept, not written again (the
    caller keeps the arguments the same). Returns the shard paths.
    """

    for kind in kinds:
        if kind not in KINDS:
            raise OmniError(f"unknown sample kind {kind!r}; choose from {', '.join(KINDS)}")
    if not kinds:
        raise OmniError(f"no sample kinds asked for; choose from {', '.join(KINDS)}")
    if scenes_per_shard < 1:
        raise OmniError(f"scenes_per_shard must be >= 1, got {scenes_per_shard}")
    _check_size(size)
    _check_grid(grid, size)
    _check_order(order)
    # a story shows each object alone: in training, those pictures must be training scenes too
    todo = scenes(n_scenes, split, seed, novel_pairs, parts="story" in kinds and split == "train", size=size,
                  grid=grid, order=order)
    return write_tar_shards(out, f"shapes-{split}", todo, scenes_per_shard, resume,
                            lambda sc: samples(sc, f"{split}-{sc.seed:x}", kinds, sample_rate))


def write_tar_shards(out: str | os.PathLike, stem: str, todo: Sequence, per_shard: int, resume: bool,
                     samples_of) -> list[Path]:
    """Write ``samples_of(x)`` (a list of WebDataset samples) for each ``x`` of ``todo`` into
    ``out/STEM-000.tar`` ..., ``per_shard`` items a shard. Each shard is written to a temp file and
    renamed, so a shard that exists is whole; with ``resume`` such shards are kept."""
    import webdataset as wds

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, first in enumerate(range(0, len(todo), per_shard)):
        path = d / f"{stem}-{j:03d}.tar"
        tmp = d / f".{path.name}.tmp"
        paths.append(path)
        if resume and path.is_file():
            continue
        try:
            with wds.TarWriter(str(tmp)) as w:
                for x in todo[first : first + per_shard]:
                    for sample in samples_of(x):
                        w.write(sample)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omni.toy.shapes", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder to write shards into")
    ap.add_argument("--scenes", type=int, default=1000, help="training scenes (default 1000)")
    ap.add_argument("--heldout", type=int, default=None,
                    help="scenes of each held-out split, validation, test and the compositional ones "
                         "(default: a tenth of --scenes)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated sample kinds ({', '.join(KINDS)})")
    ap.add_argument("--size", type=int, default=64, help="canvas side in pixels (default 64)")
    ap.add_argument("--grid", type=int, default=1, help="objects on a grid of this many pixels (default 1; the demo: 4)")
    ap.add_argument("--order", default="left_to_right", choices=ORDERS, help="object order in captions and stories")
    ap.add_argument("--per-shard", type=int, default=1000, help="scenes per shard (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", type=int, default=8, help="PNGs of the first scenes to write (default 8)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    n_heldout = max(1, args.scenes // 10) if args.heldout is None else args.heldout
    try:
        counts = {}
        for split in SPLITS:
            n = args.scenes if split == "train" else n_heldout
            counts[split] = len(write_shards(args.out, n, split, args.seed, kinds, args.per_shard, args.size,
                                             grid=args.grid, order=args.order))
        preview = Path(args.out) / "preview"
        preview.mkdir(parents=True, exist_ok=True)
        for sc in scenes(min(args.preview, args.scenes), "train", args.seed, size=args.size, grid=args.grid,
                         order=args.order):
            from PIL import Image

            Image.fromarray(sc.image).save(preview / f"{sc.seed:x}-{sc.caption.replace(' ', '_').replace(',', '')}.png")
    except OmniError as e:
        print(f"python -m omni.toy.shapes: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.scenes} train scenes and {n_heldout} of each of {', '.join(SPLITS[1:])} "
          f"({sum(counts.values())} shards) of kinds {', '.join(kinds)} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
