"""`omni train RECIPE [key=value ...]`: pretrain or fine-tune (plain-PyTorch backend).

One process: ``omni train recipe.yaml``. Several (DDP/FSDP2, gloo on CPU, NCCL on GPU):
``python -m omni.parallel.launch --nproc_per_node 2 -m omni train recipe.yaml`` (torchrun's
arguments; plain torchrun works too).
"""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.config import RunConfig, help_text

    p = sub.add_parser(
        "train",
        help="train the decoder on preprocessed token datasets",
        description="Train OmniDecoder on the token datasets of data.paths (made with the bundle "
        "data.tokenizer). Checkpoints go to train.out/step_*/ every train.save_every steps, at the "
        "end, and on SIGTERM/SIGUSR1/Ctrl-C (a second Ctrl-C aborts without saving); rerunning the same command resumes from the newest intact one. "
        "Under torchrun every rank runs this command (python -m omni.parallel.launch --nproc_per_node N -m omni "
        "train ...: torchrun's arguments, and a signal to it stops the run cleanly).",
        epilog=help_text(RunConfig),
        formatter_class=Formatter,
    )
    p.add_argument("recipe", metavar="RECIPE", help="a recipe YAML (a RunConfig), or a shipped recipe name")
    p.add_argument("--resume", default="auto", metavar="auto|none|DIR",
                   help="auto: the newest intact checkpoint in train.out (default); none: start over; "
                   "DIR: that checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (full dotted keys)")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from omni.config import RunConfig, load_config, resolve_recipe
    from omni.train.loop import train

    cfg = load_config(RunConfig, resolve_recipe(args.recipe), overrides=args.overrides)
    summary = train(cfg, resume=args.resume, progress=not args.quiet)
    if summary["stopped_by"] is None and os.environ.get("RANK", "0") == "0":
        print(f"trained to step {summary['step']} ({summary['skipped_steps']} skipped); "
              f"checkpoint {summary['checkpoint']}")
    # Ctrl-C saved a checkpoint, but the user interrupted: the shell's code for it, so `a && b` stops
    return 130 if summary["stopped_by"] == "SIGINT" else 0
