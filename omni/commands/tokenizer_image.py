"""`omni tokenizer train image` and `omni tokenizer eval image`: the VQ image tokenizer."""

from __future__ import annotations

import argparse

DATA_HELP = ("image folders (recursive), image files, WebDataset .tar shards, quoted globs, or "
             "photos:train / photos:heldout (scikit-image's photos, offline); several after one flag, or the "
             "flag repeated")


def register_train(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.commands.tokenizer import TORCHRUN_HELP
    from omni.config import help_text
    from omni.config.image_tokenizer import ImageTrainConfig

    p = sub.add_parser(
        "image",
        help="train the VQ image tokenizer",
        description="Train a VQGAN-family image tokenizer (quantizer: vq, fsq, lfq or nearest) on random "
        "crops of images, evaluate it on held-out images, and write a tokenizer folder that "
        "`omni tokenizer bundle --image DIR` takes. An existing run in --out is resumed (a finished one is "
        "left as it is, saying so). Unreadable files, corrupt or tiny images are skipped and counted. "
        + TORCHRUN_HELP.format(modality="image", key="batch_size"),
        epilog=help_text(ImageTrainConfig),
        formatter_class=Formatter,
    )
    # one convention for every tokenizer command: `--data a b` and `--data a --data b` both give [a, b]
    p.add_argument("--data", action="extend", nargs="+", required=True, metavar="DIR_OR_SHARDS", help=DATA_HELP)
    p.add_argument("--eval-data", action="extend", nargs="+", metavar="DIR_OR_SHARDS",
                   help="held-out images for periodic and final eval, as --data (default: crops of the training images)")
    p.add_argument("--config", metavar="YAML",
                   help="a recipe whose tokenizer.image section is read (e.g. recipes/tokenizers/image_vq.yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (tokenizer, checkpoints, logs)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if --out holds a run (a finished run is otherwise left as it is)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")
    p.set_defaults(func=_train)


def register_eval(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.config import help_text
    from omni.config.eval import ImageEvalConfig

    p = sub.add_parser(
        "image",
        help="evaluate an image tokenizer: PSNR, SSIM, codebook usage, speed (= omni eval image-tokenizer)",
        description="Encode and decode images with an image tokenizer and write JSON: PSNR (of the pooled "
        "MSE, and per-image mean), the same for a mean-color baseline, SSIM, codebook usage (share of "
        "codes used on these images), code perplexity, and encode / decode images per second. "
        "The same as `omni eval image-tokenizer`, with keys relative to its image section.",
        epilog=help_text(ImageEvalConfig),
        formatter_class=Formatter,
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="image tokenizer folder or bundle")
    p.add_argument("--data", action="extend", nargs="+", required=True, metavar="DIR_OR_SHARDS", help=DATA_HELP)
    p.add_argument("--out", metavar="FILE", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ImageEvalConfig overrides, see below")
    p.set_defaults(func=lambda args: _alias("image-tokenizer", "image", args))


def _alias(suite: str, section: str, args) -> int:
    from omni.commands.eval import alias

    _split_data(args)
    return alias(suite, section, args)


def _split_data(args) -> None:
    """``--data`` takes several values, so it swallows the ``key=value`` overrides that follow it: move
    them back, before the trailing ones (which stood after them on the command line: the later wins)."""
    from omni.cli import split_overrides

    swallowed = []
    for name in ("data", "eval_data"):
        values = getattr(args, name, None)
        if values:
            plain, extra = split_overrides(values)
            setattr(args, name, plain)
            swallowed += extra
    args.overrides = swallowed + list(args.overrides)


def load_image_recipe(recipe: str | None, overrides: list[str]):
    """The ``tokenizer.image`` section (an ImageTrainConfig) of a RunConfig recipe, with overrides.

    Overrides are relative to that section (``model.quantizer=fsq``, ``steps=100``).
    """
    from omni.config import load_section

    return load_section("tokenizer.image", recipe, overrides)


def _train(args) -> int:
    from omni.commands.tokenizer import data_parallel
    from omni.eval.tokenizers import ImageEvaluator
    from omni.run import TrainingStopped
    from omni.tokenizers.image_train import train_image_tokenizer

    _split_data(args)
    cfg = load_image_recipe(args.config, list(args.overrides))
    # the trainer says what it did: trained and wrote --out, found the run there finished already, or
    # stopped on a signal with a checkpoint (every rank under torchrun)
    with data_parallel(cfg.batch_size, "batch_size"):
        try:
            train_image_tokenizer(args.data, args.out, cfg, ImageEvaluator(args.eval_data, cfg, train_data=args.data),
                                  resume=not args.no_resume, progress=not args.quiet)
        except TrainingStopped as e:
            return e.exit_code
    return 0
