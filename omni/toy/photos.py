"""Real photos that ship offline with scikit-image (``skimage.data``), split into train and held-out.

Only the images scikit-image installs with the wheel are listed (the others it would download,
which this module never asks for). Grayscale photos are repeated to RGB. The held-out photos are
whole images the training split never sees, so held-out figures measure generalization to new
photos, not to new crops of known ones.

``python -m omni.toy.photos DIR [--split train|heldout|all]`` writes them as PNG files, a folder
that ``omni tokenizer train image --data DIR`` reads; the trainer also takes ``--data photos:train``
and ``photos:heldout`` directly.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TRAIN = (
    "astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle_left", "stereo_motorcycle_right",
    "brick", "cell", "clock", "grass", "gravel", "moon", "page", "text",
)
"""Training photos: 7 color, 8 grayscale."""
HELDOUT = ("coffee", "rocket", "camera", "coins")
"""Held-out photos: 2 color, 2 grayscale."""
SPLITS = {"train": TRAIN, "heldout": HELDOUT, "all": TRAIN + HELDOUT}


def photo(name: str):
    """One photo as uint8 [H,W,3] (grayscale repeated to RGB)."""
    import numpy as np
    import skimage.data

    from omni.errors import OmniError

    if name not in SPLITS["all"]:
        raise OmniError(f"unknown photo {name!r}; offline photos: {', '.join(SPLITS['all'])}")
    if name.startswith("stereo_motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        a = left if name.endswith("left") else right
    else:
        a = getattr(skimage.data, name)()
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3].astype(np.uint8))


def photos(split: str = "train") -> list[tuple[str, object]]:
    """``[(name, uint8 [H,W,3])]`` of a split: 'train', 'heldout' or 'all'."""
    from omni.errors import OmniError

    if split not in SPLITS:
        raise OmniError(f"unknown photo split {split!r}; choose one of {', '.join(SPLITS)}")
    return [(n, photo(n)) for n in SPLITS[split]]


def source(split: str):
    """The data source ``photos:SPLIT`` of :data:`omni.media.SOURCES`: ``(name, uint8 [H,W,3])`` of a
    split, read lazily; an unknown split is refused at once."""
    from omni.errors import OmniError

    if split not in SPLITS:
        raise OmniError(f"unknown data source 'photos:{split}'; photo splits: "
                        + ", ".join(f"photos:{s}" for s in SPLITS))
    return ((n, photo(n)) for n in SPLITS[split])


def random_crops(images, n: int, size: int, seed: int = 0):
    """``n`` native-resolution ``size``x``size`` crops, drawn uniformly over images and positions.

    ``images`` are uint8 [H,W,3] arrays (or ``(name, array)`` pairs); returns float [n,3,size,size] in [0,1].
    """
    import numpy as np
    import torch

    arrays = [im[1] if isinstance(im, tuple) else im for im in images]
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        a = arrays[rng.integers(len(arrays))]
        h, w = a.shape[:2]
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        crop = a[top : top + size, left : left + size]
        out[i] = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255.0
    return out


def export(directory: str | os.PathLike, split: str = "all") -> list[Path]:
    """Write a split's photos as ``DIR/<name>.png``; returns the paths."""
    from PIL import Image

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, a in photos(split):
        p = d / f"{name}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omni.toy.photos", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder to write PNG files into")
    ap.add_argument("--split", default="all", choices=sorted(SPLITS))
    args = ap.parse_args(argv)
    paths = export(args.out, args.split)
    print(f"wrote {len(paths)} photos to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
