"""`omni convert ...`: checkpoints between omni and other stacks (Hugging Face Chameleon, both ways)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter

    p = sub.add_parser("convert", help="convert checkpoints between omni and other stacks (Hugging Face Chameleon)",
                       formatter_class=Formatter)
    csub = p.add_subparsers(dest="convert_cmd", metavar="CONVERSION", required=True)
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

    h = csub.add_parser(
        "to-hf",
        help="an omni checkpoint -> a Hugging Face transformers Chameleon checkpoint",
        description="Write an omni checkpoint as a folder that transformers' "
        "ChameleonForConditionalGeneration.from_pretrained loads (config.json, model.safetensors, and "
        "tokenizer.json + tokenizer_config.json where the text tokenizer converts). Token ids are kept "
        "verbatim; text and image-code logits equal omni's. A decoder that does not map onto Chameleon "
        "(no QK-norm, an RMSNorm QK-norm, a QK-norm eps other than 1e-5, ...) is refused with every such "
        "value listed, and nothing is written. transformers' own image encoding applies only when the "
        "image tokenizer is Chameleon's VQGAN (an imported one); the output says what applies.",
        formatter_class=Formatter,
    )
    h.add_argument("--checkpoint", required=True, metavar="DIR", help="omni checkpoint folder, or a run folder (its newest intact step)")
    h.add_argument("--out", required=True, metavar="DIR", help="Hugging Face folder to write")
    h.add_argument("--force", action="store_true", help="replace --out if it already exists")
    h.set_defaults(func=_to_hf)


def _out(args):
    """``--out``, refused when it exists unless ``--force``."""
    from pathlib import Path

    from omni.errors import OmniError

    out = Path(args.out)
    if out.exists() and not args.force:
        raise OmniError(f"{out} already exists; pass --force to replace it")
    return out


def _chameleon(args) -> int:
    from omni.chameleon import convert_chameleon

    path = convert_chameleon(args.hf, _out(args))
    print(f"wrote {path}")
    return 0


def _to_hf(args) -> int:
    from omni.chameleon_export import export_to_hf
    from omni.checkpoint import resolve_checkpoint

    export = export_to_hf(resolve_checkpoint(args.checkpoint), _out(args))
    print(f"wrote {export.path} (transformers ChameleonForConditionalGeneration)")
    for line in export.notes:
        print(f"  - {line}")
    return 0
