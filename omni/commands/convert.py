"""`omni convert ...`: checkpoints between omni and other stacks (Hugging Face Chameleon and megatron-core,
both ways)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter

    p = sub.add_parser("convert", help="convert checkpoints between omni and other stacks (Hugging Face Chameleon, megatron-core)",
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

    f = csub.add_parser(
        "from-megatron",
        help="a megatron-core step folder -> an omni checkpoint",
        description="Read a step folder of a parallel.backend=megatron run (any step, any tensor x pipeline "
        "layout it was trained at): its megatron/ dist_checkpointing (torch_dist) tensors at their global "
        "shapes, read in this one process (no GPU, no megatron model), the model config from its run.yaml "
        "and the tokenizer bundle from its tokenizer/ folder or run.yaml's data.tokenizer. Writes an omni "
        "checkpoint (model.safetensors, config.yaml, tokenizer/, meta.json) that omni.load and omni "
        "generate read. Optimizer state is skipped.",
        formatter_class=Formatter,
    )
    f.add_argument("--checkpoint", required=True, metavar="STEP_DIR", help="megatron step folder (holds megatron/ and run.yaml)")
    f.add_argument("--out", required=True, metavar="DIR", help="omni checkpoint folder to write")
    f.add_argument("--force", action="store_true", help="replace --out if it already exists")
    f.set_defaults(func=_from_megatron)

    t = csub.add_parser(
        "to-megatron",
        help="an omni checkpoint -> a model-only megatron-core dist_checkpointing folder",
        description="Write an omni checkpoint as a model-only megatron step folder: megatron/ (torch_dist "
        "dist_checkpointing, the keys and global shapes megatron-core's GPTModel.sharded_state_dict() "
        "writes, so it loads at any tensor x pipeline layout), run.yaml (the model, parallel.backend="
        "megatron with --tensor / --pipeline) and tokenizer/. No optimizer state: a run starts from it, "
        "it does not resume one. Written in this one process, no GPU needed.",
        formatter_class=Formatter,
    )
    t.add_argument("--checkpoint", required=True, metavar="DIR", help="omni checkpoint folder, or a run folder (its newest intact step)")
    t.add_argument("--out", required=True, metavar="DIR", help="megatron step folder to write")
    t.add_argument("--tensor", type=int, default=1, metavar="T",
                   help="tensor-parallel size to record (must divide n_heads, n_kv_heads, ffn_dim)")
    t.add_argument("--pipeline", type=int, default=1, metavar="P", help="pipeline-parallel size to record (must divide n_layers)")
    t.add_argument("--force", action="store_true", help="replace --out if it already exists")
    t.set_defaults(func=_to_megatron)


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


def _from_megatron(args) -> int:
    from omni.megatron_checkpoint import from_megatron_checkpoint

    out = _out(args)
    path = from_megatron_checkpoint(args.checkpoint, out)
    print(f"wrote {path} (omni checkpoint)")
    return 0


def _to_megatron(args) -> int:
    from omni.megatron_checkpoint import to_megatron_checkpoint

    out = _out(args)
    path = to_megatron_checkpoint(args.checkpoint, out, tensor=args.tensor, pipeline=args.pipeline)
    print(f"wrote {path} (megatron-core dist_checkpointing, model only; parallel.tensor={args.tensor} "
          f"pipeline={args.pipeline} in its run.yaml)")
    return 0
