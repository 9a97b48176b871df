"""`omni convert ...`: import checkpoints of other stacks as omni checkpoints."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter

    p = sub.add_parser("convert", help="import checkpoints from other stacks", formatter_class=Formatter)
    csub = p.add_subparsers(dest="convert_cmd", metavar="SOURCE", required=True)
    c = csub.add_parser(
        "chameleon",
        help="a Hugging Face Chameleon checkpoint -> an omni checkpoint",
        description="Read a Hugging Face ChameleonForConditionalGeneration folder (config.json + "
        "safetensors, optionally tokenizer.json) and write an omni checkpoint: decoder weights copied "
        "verbatim, the VQ image tokenizer, and a tokenizer bundle that keeps Chameleon's token ids.",
        formatter_class=Formatter,
    )
    c.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face Chameleon folder")
    c.add_argument("--out", required=True, metavar="DIR", help="omni checkpoint folder to write")
    c.add_argument("--force", action="store_true", help="replace --out if it already exists")
    c.set_defaults(func=_chameleon)


def _chameleon(args) -> int:
    from pathlib import Path

    from omni.chameleon import convert_chameleon
    from omni.errors import OmniError

    out = Path(args.out)
    if out.exists() and not args.force:
        raise OmniError(f"{out} already exists; pass --force to replace it")
    path = convert_chameleon(args.hf, out)
    print(f"wrote {path}")
    return 0
