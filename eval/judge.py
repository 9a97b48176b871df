"""A judge for generated toy scenes: which (color, shape) objects of :mod:`omni.toy.shapes` an image shows.

``omni demo`` asks its model for "a red circle" and needs to know whether the picture it drew
shows one. The judge reads an image in three steps:

1. **color per pixel**: each pixel is read as a blend of white (the background) and one palette
   color (:data:`omni.toy.shapes.COLORS`, the toy world's ground truth), the color whose
   white-to-color line passes nearest in RGB, so blurred edges keep their color; mostly white
   is background, far from every line (``max_residual``) is "off-palette";
2. **objects**: 8-connected components of non-background pixels (``scipy.ndimage.label``; objects
   of a scene never touch), each with its majority color; a component too small
   (``min_area``) or of mixed or off-palette colors (majority share under ``min_purity``) is no object;
3. **shape**: a small MLP, trained on the toy world's ground truth, classifies the component's
   binary mask (cropped to its box, resized to ``mask_size`` squared, plus fill ratio and aspect)
   as one of the shapes or as ``junk``.

The MLP is trained on components found by steps 1-2 in lightly degraded scenes (pixel noise,
blur or half resolution, brightness shifts, like a small VQ decoder's output) and in object-free images (uniform
and blocky noise, whose components are labelled ``junk``), so training sees exactly what
inference sees. Random noise mostly forms one large many-colored component and is read as
"no object". Why not one CNN over the whole image: a CNN that counted every (color, shape) pair
trained for minutes on 2 CPU cores and still misread most scenes; segmenting first leaves a
tiny, fast classification problem (seconds) that generalizes to any number of objects.

    judge = train_judge(n_scenes=600, seed=0)
    judge.predict(images)             # per image, the [(color, shape)] it shows, sorted
    judge.read(image)                 # [(color, shape, box)] left to right
    judge.correct(image, "a red circle and a blue square")   # True / False
    judge.save("runs/judge"); judge = Judge.load("runs/judge")   # safetensors + judge.json

``python -m omni.eval.judge [--scenes N] [--out DIR]`` trains one and prints its accuracy on test-split scenes.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omni.config.base import check
from omni.errors import OmniError
from omni.toy import shapes as toy

WEIGHTS = "judge.safetensors"
CONFIG = "judge.json"
JUNK = "junk"
"""The shape classifier's extra class: a component that is no toy object."""


@dataclass
class JudgeConfig:
    """The judge's thresholds, its shape classifier and the toy world it reads."""

    size: int = 64
    """Square pixel size images are resized to before reading (the scenes' canvas size)."""
    colors: list[str] = field(default_factory=lambda: list(toy.COLORS))
    """Color names it tells apart (of omni.toy.shapes.COLORS)."""
    shapes: list[str] = field(default_factory=lambda: list(toy.SHAPES))
    """Shape names it tells apart (of omni.toy.shapes.SHAPES)."""
    mask_size: int = 16
    """Side of the resized component mask the shape classifier reads."""
    hidden: int = 64
    """Hidden units of the shape classifier (an MLP with one hidden layer)."""
    min_area: int = 16
    """Least pixels (at ``size``) of a component that can be an object."""
    min_purity: float = 0.6
    """Least share of a component's pixels that have its majority color."""
    max_residual: float = 70.0
    """Largest RGB distance of a pixel from the nearest white-to-color blend that still counts as that color."""

    def __post_init__(self) -> None:
        check(isinstance(self.size, int) and self.size >= toy.MIN_CANVAS, "size", self.size,
              f"an integer >= {toy.MIN_CANVAS}")
        check(bool(self.colors) and all(c in toy.COLORS for c in self.colors), "colors", self.colors,
              f"a non-empty list of {', '.join(toy.COLORS)}")
        check(bool(self.shapes) and all(s in toy.SHAPES for s in self.shapes), "shapes", self.shapes,
              f"a non-empty list of {', '.join(toy.SHAPES)}")
        check(4 <= self.mask_size <= 64, "mask_size", self.mask_size, "an integer in [4, 64]")
        check(1 <= self.hidden <= 1024, "hidden", self.hidden, "an integer in [1, 1024]")
        check(1 <= self.min_area <= self.size * self.size, "min_area", self.min_area, "an integer in [1, size**2]")
        check(0.0 <= self.min_purity <= 1.0, "min_purity", self.min_purity, "a share in [0, 1]")
        check(0.0 < self.max_residual <= 442.0, "max_residual", self.max_residual, "an RGB distance in (0, 442]")


class ShapeNet(nn.Module):
    """Component features [B, mask_size**2 + 2] -> logits [B, shapes + 1] (the last: junk)."""

    def __init__(self, cfg: JudgeConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.mask_size**2 + 2, cfg.hidden), nn.ReLU(),
                                 nn.Linear(cfg.hidden, len(cfg.shapes) + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _pixels(images, size: int) -> list[np.ndarray]:
    """Images (a [B,3,H,W] tensor, or a list of PIL / uint8 [H,W,3] / float [3,H,W]) -> float [S,S,3] in [0,255]."""
    from omni.document import to_pixels

    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise OmniError("no images to judge")
    out = []
    for im in items:
        px = to_pixels(im)  # float [3,H,W] in [0,1]
        if px.shape[1:] != (size, size):
            px = F.interpolate(px[None], size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp(0, 1)
        out.append(px.permute(1, 2, 0).numpy() * 255.0)
    return out


@dataclass
class Component:
    """One connected non-background region: its majority color, box, features for the shape MLP."""

    color: str
    purity: float
    box: tuple[int, int, int, int]
    """(x0, y0, x1, y1), end-exclusive."""
    features: np.ndarray
    """float32 [mask_size**2 + 2]: the box's mask resized, then fill ratio and aspect (w / (w + h))."""


def components(pixels: np.ndarray, cfg: JudgeConfig) -> list[Component]:
    """Steps 1-2 of the module docstring on one float [S,S,3] image in [0,255]; left to right."""
    import scipy.ndimage as ndi

    white = np.array(toy.BACKGROUND, dtype=np.float32)
    d = np.array([toy.COLORS[c] for c in cfg.colors], dtype=np.float32) - white  # [C,3]: white -> color
    v = pixels - white  # [S,S,3]
    # each pixel as a mix of white and one color (edges blend with the background): p = white + a*d
    a = np.clip((v @ d.T) / (d * d).sum(-1), 0, 1)  # [S,S,C]
    resid = np.sqrt(((v[:, :, None, :] - a[..., None] * d) ** 2).sum(-1))  # [S,S,C]
    best = resid.argmin(-1)  # [S,S]
    alpha = np.take_along_axis(a, best[..., None], -1)[..., 0]
    fit = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    # 0: background (more white than color), i: cfg.colors[i-1], C+1: a color off the palette
    cls = np.where(fit > cfg.max_residual, len(d) + 1, np.where(alpha < 0.5, 0, best + 1))
    labels, n = ndi.label(cls > 0, structure=np.ones((3, 3), dtype=bool))
    out = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        mask = labels[sl] == i
        area = int(mask.sum())
        if area < cfg.min_area:
            continue
        counts = np.bincount(cls[sl][mask], minlength=len(d) + 2)
        color = int(counts[1 : len(d) + 1].argmax()) + 1
        h, w = mask.shape
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        m = F.interpolate(m, size=(cfg.mask_size, cfg.mask_size), mode="area")[0, 0].numpy()  # [M,M]
        feats = np.concatenate([m.ravel(), [area / (h * w), w / (w + h)]]).astype(np.float32)
        out.append(Component(cfg.colors[color - 1], float(counts[color] / area),
                             (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), feats))
    return sorted(out, key=lambda c: (c.box[0] + c.box[2], c.box[1]))


class Judge:
    """Reads toy objects out of images (see the module docstring)."""

    def __init__(self, cfg: JudgeConfig, net: ShapeNet | None = None):
        self.config = cfg
        self.net = (net or ShapeNet(cfg)).eval()
        self.pairs = [(c, s) for c in cfg.colors for s in cfg.shapes]

    @torch.no_grad()
    def read(self, images) -> list[list[tuple[str, str, tuple[int, int, int, int]]]]:
        """Per image, ``[(color, shape, box)]`` of the objects it shows, left to right by box center.

        Boxes are in pixels of the image resized to ``config.size``.
        """
        out = []
        for px in _pixels(images, self.config.size):
            comps = [c for c in components(px, self.config) if c.purity >= self.config.min_purity]
            objs = []
            if comps:
                pred = self.net(torch.from_numpy(np.stack([c.features for c in comps]))).argmax(-1).tolist()
                objs = [(c.color, self.config.shapes[k], c.box) for c, k in zip(comps, pred)
                        if k < len(self.config.shapes)]
            out.append(objs)
        return out

    def predict(self, images) -> list[list[tuple[str, str]]]:
        """Per image, the ``(color, shape)`` of each object it shows (a pair repeats per object),
        sorted by name; ``[]`` when it sees no toy object (noise, blank)."""
        return [sorted((c, s) for c, s, _ in objs) for objs in self.read(images)]

    def correct(self, image, caption: str) -> bool:
        """Whether ``image`` shows exactly the objects ``caption`` names, as a multiset: positions,
        sizes and the order of the caption are not judged. A caption naming no object is an error."""
        want = toy.parse_caption(caption)
        if not want:
            raise OmniError(f"caption {caption!r} names no object: expected phrases like 'a red circle' "
                            f"(colors: {', '.join(toy.COLORS)}; shapes: {', '.join(toy.SHAPES)})")
        for c, s in want:
            if (c, s) not in self.pairs:
                raise OmniError(f"this judge reads colors {', '.join(self.config.colors)} and shapes "
                                f"{', '.join(self.config.shapes)}; the caption names a {c} {s}")
        return collections.Counter(self.predict([image])[0]) == collections.Counter(want)

    def evaluate(self, scenes: Sequence[toy.Scene]) -> dict[str, float]:
        """Shares of scenes whose multiset of (color, shape) is read exactly: over all (``exact``) and
        by number of objects (``exact_1`` ...)."""
        preds = self.predict([sc.image for sc in scenes])
        right = [collections.Counter(p) == collections.Counter(sc.pairs) for p, sc in zip(preds, scenes)]
        out = {"exact": float(np.mean(right)) if right else 0.0}
        for k in range(1, toy.MAX_OBJECTS + 1):
            sel = [r for r, sc in zip(right, scenes) if len(sc.objects) == k]
            if sel:
                out[f"exact_{k}"] = float(np.mean(sel))
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``judge.safetensors`` + ``judge.json`` (the config) atomically; returns the folder."""
        from safetensors.torch import save

        from omni.io import atomic_write_bytes, atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        atomic_write_bytes(d / WEIGHTS, save(state))
        atomic_write_text(d / CONFIG, json.dumps(asdict(self.config), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Judge:
        """A judge written by :meth:`save`; a folder without one, or with mismatched files, is an OmniError."""
        from safetensors.torch import load_file

        from omni.config.base import load_config

        d = Path(directory)
        for name in (CONFIG, WEIGHTS):
            if not (d / name).is_file():
                raise OmniError(f"{d} is not a judge folder: {name} is missing (write one with Judge.save)")
        try:
            data = json.loads((d / CONFIG).read_text())
        except ValueError as e:
            raise OmniError(f"{d / CONFIG} is not valid JSON: {e}") from None
        judge = cls(load_config(JudgeConfig, data))
        try:
            judge.net.load_state_dict(load_file(str(d / WEIGHTS)))
        except Exception as e:  # safetensors header errors, missing or mis-shaped tensors
            raise OmniError(f"{d / WEIGHTS} does not fit {d / CONFIG}: {type(e).__name__}: {e}") from None
        judge.net.eval()
        return judge


def load(directory: str | os.PathLike) -> Judge:
    """:meth:`Judge.load`."""
    return Judge.load(directory)


def judged_suite(checkpoint, data, judge_dir: str, suite: str, key: str, made: str):
    """(model on the CPU, bundle, judge) of a suite that judges the pictures a checkpoint makes of the
    toy world (gen-head, longwrite). Refused, each an OmniError: ``data`` given (the suite makes its
    ``made`` from the toy world), the judge folder ``judge_dir`` (config key ``key``) unset or not a
    judge, a bundle without an image tokenizer."""
    from omni.checkpoint import load as load_checkpoint

    if data:
        raise OmniError(f"the {suite} suite makes its {made} from the toy world; it takes no --data")
    if not judge_dir:
        raise OmniError(f"{key} is not set: give the folder of a trained toy-world judge (an `omni demo` "
                        "folder's judge/)")
    judge = Judge.load(judge_dir)
    model, tok = load_checkpoint(checkpoint, device="cpu")
    if tok.image is None:
        raise OmniError(f"{checkpoint}: its bundle has no image tokenizer, which the {suite} suite's pictures need")
    return model, tok, judge


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def noise_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` images without toy objects, uint8 [n,S,S,3], alternating uniform noise and blocky color
    noise (random colors on a 2, 4 or 8 px grid)."""
    rng = np.random.default_rng([seed, 11])
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        if i % 2 == 0:
            out[i] = rng.integers(0, 256, (size, size, 3))
        else:
            cell = int(rng.choice([2, 4, 8]))
            coarse = rng.integers(0, 256, (size // cell + 1, size // cell + 1, 3), dtype=np.uint8)
            out[i] = coarse.repeat(cell, 0).repeat(cell, 1)[:size, :size]
    return out


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light random damage, like a small VQ decoder's output: blur or half-resolution, brightness, pixel noise.

    uint8 [S,S,3] -> float [S,S,3] in [0,255].
    """
    import scipy.ndimage as ndi

    x = image.astype(np.float32)
    r = rng.random()
    if r < 0.3:
        sigma = rng.uniform(0.3, 0.8)
        x = ndi.gaussian_filter(x, sigma=(sigma, sigma, 0))
    elif r < 0.6:  # made at half the size and upsampled, as by a lower-resolution image tokenizer
        t = torch.from_numpy(x).permute(2, 0, 1)[None]
        low = F.interpolate(t, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        x = F.interpolate(low, size=t.shape[-2:], mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    x = x + rng.uniform(-12, 12)  # brightness
    x = x + rng.normal(0, rng.uniform(0, 12), x.shape)  # pixel noise
    return np.clip(x, 0, 255)


def _examples(scenes: Sequence[toy.Scene], noise: np.ndarray, cfg: JudgeConfig, rng: np.random.Generator):
    """Components of degraded scenes and noise images with their shape labels (len(shapes): junk)."""
    feats, labels = [], []
    junk = len(cfg.shapes)
    for sc in scenes:
        for c in components(degrade(sc.image, rng), cfg):
            cx, cy = (c.box[0] + c.box[2]) / 2, (c.box[1] + c.box[3]) / 2
            label = junk  # a stray piece matched to no object
            for o in sc.objects:
                x0, y0, x1, y1 = o.box
                inside = x0 <= cx < x1 and y0 <= cy < y1
                if inside and (c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) >= 0.5 * (x1 - x0) * (y1 - y0):
                    label = cfg.shapes.index(o.shape)
            feats.append(c.features)
            labels.append(label)
    for im in noise:
        for c in components(degrade(im, rng), cfg):
            feats.append(c.features)
            labels.append(junk)
    return torch.from_numpy(np.stack(feats)), torch.tensor(labels)


def train_judge(n_scenes: int = 600, seed: int = 0, cfg: JudgeConfig | None = None, n_noise: int | None = None,
                steps: int = 400, lr: float = 3e-3, progress: bool = False) -> Judge:
    """Train a judge's shape classifier on ``n_scenes`` training-split scenes (stream ``seed``) of
    :mod:`omni.toy.shapes` plus ``n_noise`` noise images (default: a fifth of ``n_scenes``).

    Full-batch AdamW for ``steps`` steps; deterministic for a seed. Scenes use only ``cfg.colors``
    and ``cfg.shapes``.
    """
    cfg = cfg or JudgeConfig()
    if n_scenes < 1:
        raise OmniError(f"n_scenes must be >= 1, got {n_scenes}")
    n_noise = n_scenes // 5 if n_noise is None else n_noise
    scenes = toy.scenes(n_scenes, "train", seed, size=cfg.size, colors=cfg.colors, shapes=cfg.shapes)
    x, y = _examples(scenes, noise_images(n_noise, cfg.size, seed), cfg, np.random.default_rng([seed, 5]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ShapeNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    net.train()
    for step in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step + 1) % 100 == 0:
            with torch.no_grad():
                acc = float((net(x).argmax(-1) == y).float().mean())
            print(f"judge step {step + 1}/{steps}: loss {loss.item():.4f}, train accuracy {acc:.4f}")
    return Judge(cfg, net.eval())


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m omni.eval.judge", description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=600, help="training scenes (default 600)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--test", type=int, default=1000, help="test-split scenes to score (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder to save the judge into")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    judge = train_judge(args.scenes, args.seed, steps=args.steps, progress=True)
    print(f"trained on {args.scenes} scenes in {time.perf_counter() - t0:.1f}s")
    held = toy.scenes(args.test, "test", args.seed + 1)
    single = toy.scenes(args.test, "test", args.seed + 1, n_objects=1)
    rng = np.random.default_rng([args.seed, 3])
    print(f"test scenes, clean: {judge.evaluate(held)}")
    print(f"test single-object scenes, clean: {judge.evaluate(single)['exact']:.4f}")
    degraded = [sc.image for sc in held]
    dpred = judge.predict([degrade(im, rng).astype(np.uint8) for im in degraded])
    dright = np.mean([collections.Counter(p) == collections.Counter(sc.pairs) for p, sc in zip(dpred, held)])
    print(f"test scenes, degraded: {dright:.4f}")
    noise = noise_images(300, judge.config.size, args.seed + 1)
    print(f"noise images read as empty: {np.mean([p == [] for p in judge.predict(list(noise))]):.4f}")
    if args.out:
        print(f"saved to {judge.save(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
