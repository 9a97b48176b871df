"""The sweep behind the demo's image-tokenizer recipe: how many scenes survive encode -> decode, on the VALIDATION splits.

Not a speed bench: a recipe sweep. Caption to image can be no better than the image tokenizer lets
it be, and what limits the tokenizer shows without training a decoder: for each setting (``key=value``
overrides of recipes/demo/default.yaml), train the demo's image tokenizer on a finished demo's
training images (``DEMO_DIR/world/caption``), encode and decode real scenes of ``validation`` and
``compositional_validation`` (never ``test``: the recipe is chosen here, the test split is reported
once by ``omni demo``), and print the share the demo's judge (``DEMO_DIR/judge``) reads as exactly
their caption, by number of objects, with the codes used. ``omni eval demo`` reports the same
ceiling for a finished run as ``caption_to_image.judge_on_reconstructions``.

    nice -n 19 .venv/bin/python bench/demo_tokenizer_sweep.py runs/demo \\
        steps800:tokenizer.image.steps=800 steps1600:tokenizer.image.steps=1600
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import header, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo", type=Path, help="a finished `omni demo` folder (its world/caption shards and judge)")
    ap.add_argument("settings", nargs="+", metavar="NAME:key=value[,key=value]",
                    help="named settings to compare (NAME: alone is the recipe as it is)")
    ap.add_argument("--scenes", type=int, default=200, help="scenes per split (default 200)")
    args = ap.parse_args(argv)
    header(__doc__.split("\n")[0], args)

    from omni.demo import demo_config
    from omni.eval.demo import reconstructed_correct
    from omni.eval.judge import Judge
    from omni.eval.tokenizers import ImageEvaluator
    from omni.tokenizers.image_train import train_image_tokenizer
    from omni.toy import shapes

    judge = Judge.load(args.demo / "judge")
    data = [str(args.demo / "world" / "caption")]
    rows = []
    for setting in args.settings:
        name, _, keys = setting.partition(":")
        cfg = demo_config("default", [k for k in keys.split(",") if k])
        w = cfg.demo
        world = dict(novel_pairs=w.pairs, size=w.canvas, grid=w.grid, order=w.order)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            tok = train_image_tokenizer(data, Path(tmp), cfg.tokenizer.image,
                                        ImageEvaluator(None, cfg.tokenizer.image, train_data=data, log=lambda s: None),
                                        resume=False, progress=False, log=lambda s: None).eval()
        seconds = time.perf_counter() - t
        for split in ("validation", "compositional_validation"):
            scenes = shapes.scenes(args.scenes, split, **world)
            ok = reconstructed_correct(tok, judge, scenes)
            with torch.no_grad():
                codes = tok.encode(torch.stack([torch.from_numpy(sc.image).permute(2, 0, 1).float() / 255
                                                for sc in scenes]))  # [B,h,w]
            by_n = [np.mean([o for o, sc in zip(ok, scenes) if len(sc.objects) == n]) for n in (1, 2, 3)]
            rows.append([name, split, f"{np.mean(ok):.1%}", *(f"{v:.1%}" for v in by_n),
                         int(codes.unique().numel()), f"{seconds:.0f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    table(f"judged right after encode -> decode ({args.scenes} scenes per split)",
          ["setting", "split", "all", "1 object", "2 objects", "3 objects", "codes used", "train s"], rows, left=(0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
