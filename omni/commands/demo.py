"""`omni demo`: train a toy any-to-any model end to end and write index.html + metrics.json."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.demo import BUDGETS, STAGES

    p = sub.add_parser(
        "demo",
        help="train a toy any-to-any model end to end and show what it learned",
        description="Make a toy world (scenes of colored shapes, captions, espeak-ng speech, stories, "
        "detection and generation documents), train the text, image and audio tokenizers on it, preprocess, "
        "pretrain an OmniDecoder with its <det> and <gen> heads (recipes/demo/default.yaml), then generate on test scenes (disjoint from training by content) "
        f"and measure: DIR/index.html and DIR/metrics.json. Stages: {', '.join(STAGES)}. An interrupted "
        "demo resumes where it stopped when the same command is run again.",
        formatter_class=Formatter,
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--budget", default="default", choices=BUDGETS,
                   help="default: the README's figures (recipes/demo/default.yaml); small: a few-minute run "
                   "(adds recipes/demo/small.yaml); large: about an hour (adds recipes/demo/large.yaml)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (stage lines are still printed)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="DemoRunConfig overrides (full dotted keys: a RunConfig's and demo.*)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from omni.demo import run_demo

    try:
        run_demo(args.out, args.budget, list(args.overrides), progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"omni demo: interrupted; run the same command again to resume from {args.out}")
        raise
    return 0
