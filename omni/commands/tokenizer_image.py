"""`omni tokenizer train image` and `omni tokenizer eval image`: the VQ image tokenizer."""

from __future__ import annotations

import argparse

DATA_HELP = ("an image folder (recursive), an image file, a WebDataset .tar shard, a quoted glob, or "
             "photos:train / photos:heldout (scikit-image's photos, offline); repeat the flag for more")


def register_train(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.config import help_text
    from omni.config.image_tokenizer import ImageTrainConfig

    p = sub.add_parser(
        "image",
        help="train the VQ image tokenizer",
        description="Train a VQGAN-family image tokenizer (quantizer: vq, fsq, lfq or nearest) on random "
        "crops of images, evaluate it on held-out images, and write a tokenizer folder that "
        "`omni tokenizer bundle --image DIR` takes. An existing run in --out is resumed. Unreadable "
        "files, corrupt or tiny images are skipped and counted.",
        epilog=help_text(ImageTrainConfig),
        formatter_class=Formatter,
    )
    p.add_argument("--data", action="append", required=True, metavar="DIR_OR_SHARDS", help=DATA_HELP)
    p.add_argument("--eval-data", action="append", metavar="DIR_OR_SHARDS",
                   help="held-out images for periodic and final eval, as --data (default: crops of the training images)")
    p.add_argument("--config", metavar="YAML",
                   help="a recipe whose tokenizer.image section is read (e.g. recipes/tokenizers/image_vq.yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (tokenizer, checkpoints, logs)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")
    p.set_defaults(func=_train)


def register_eval(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter

    p = sub.add_parser(
        "image",
        help="evaluate an image tokenizer: PSNR, SSIM, codebook usage, speed",
        description="Encode and decode images with an image tokenizer and write JSON: PSNR (of the pooled "
        "MSE, and per-image mean), the same for a mean-color baseline, SSIM, codebook usage (share of "
        "codes used on these images), code perplexity, and encode / decode images per second.",
        formatter_class=Formatter,
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="image tokenizer folder or bundle")
    p.add_argument("--data", action="append", required=True, metavar="DIR_OR_SHARDS", help=DATA_HELP)
    p.add_argument("--crops", type=int, default=16, metavar="N",
                   help="native-resolution random crops per image (seeded); 0: each whole image, resized "
                   "and center-cropped by the tokenizer's rule (default 16)")
    p.add_argument("--max-images", type=int, default=2048, metavar="N", help="at most this many eval images")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
    p.add_argument("--out", metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_eval)


def load_image_recipe(recipe: str | None, overrides: list[str]):
    """The ``tokenizer.image`` section (an ImageTrainConfig) of a RunConfig recipe, with overrides.

    Overrides are relative to that section (``model.quantizer=fsq``, ``steps=100``).
    """
    from omni.config import load_section

    return load_section("tokenizer.image", recipe, overrides)


def _train(args) -> int:
    from omni.tokenizers.image_train import train_image_tokenizer

    cfg = load_image_recipe(args.config, list(args.overrides))
    train_image_tokenizer(args.data, args.out, cfg, eval_data=args.eval_data, resume=not args.no_resume,
                          progress=not args.quiet)
    print(f"wrote {args.out}")
    return 0


def _eval(args) -> int:
    import json

    from omni.errors import OmniError
    from omni.io import atomic_write_text
    from omni.media import SkipReport
    from omni.tokenizers.base import load_tokenizer
    from omni.tokenizers.image_train import eval_images, evaluate

    for name in ("crops", "batch_size", "max_images"):
        v = getattr(args, name)
        if v < (0 if name == "crops" else 1):
            raise OmniError(f"--{name.replace('_', '-')} must be >= {0 if name == 'crops' else 1}, got {v}")
    tok = load_tokenizer(args.tokenizer, "image")
    report = SkipReport()
    size = tok.image_size[0]
    images = eval_images(args.data, size, args.crops, args.max_images, report, min_side=1, seed=args.seed,
                         preprocess=tok.preprocess)
    m = evaluate(tok, images, batch_size=args.batch_size)
    m["data"] = report.to_json()
    m["mode"] = f"{args.crops} native-resolution crops per image" if args.crops else "whole images, resize + center crop"
    text = json.dumps(m, indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0
