"""`omni eval SUITE`: run an evaluation suite of omni.eval.SUITES on a checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.config import help_text
    from omni.config.eval import EvalConfig
    from omni.eval import SUITES

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint with a suite (tokenizers, the any-to-any demo)",
        description="Run one evaluation suite and print its figures as JSON (and write DIR/metrics.json "
        "with --out). Suites: image-tokenizer and audio-tokenizer (--checkpoint: a tokenizer folder or "
        "a bundle; --data: held-out images or clips), demo (--checkpoint: a finished `omni demo` folder; "
        "its scenes are made from its own config; demo.split=validation (default) or test), detection "
        "(--checkpoint: a checkpoint with a <det> head; COCO AP on toy-world scenes of detection.split, "
        "with chance rows), gen-head (--checkpoint: a checkpoint with a <gen> head; gen.judge=JUDGE_DIR; "
        "its images for held-out captions, judged).",
        epilog=help_text(EvalConfig),
        formatter_class=Formatter,
    )
    p.add_argument("suite", choices=sorted(SUITES), metavar="SUITE", help=f"one of {', '.join(sorted(SUITES))}")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="what to evaluate")
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="evaluation data (folders, files, .tar shards, photos:heldout); repeat for more")
    p.add_argument("--out", metavar="DIR", help="write metrics.json (and the suite's page, if any) here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="EvalConfig overrides, see below")
    p.set_defaults(func=_eval)


def run_suite(name: str, checkpoint: str, data: Sequence[str], overrides: Sequence[str], out=None) -> dict:
    """Load the EvalConfig with ``overrides`` and run suite ``name``; the one path of `omni eval` and
    its `omni tokenizer eval` aliases."""
    from pathlib import Path

    from omni.config import load_config
    from omni.config.eval import EvalConfig
    from omni.eval import suite

    cfg = load_config(EvalConfig, overrides=list(overrides))
    return suite(name)(Path(checkpoint), list(data), cfg, None if out is None else Path(out))


def _eval(args) -> int:
    import json
    from pathlib import Path

    from omni.eval.tokenizers import write_json

    m = run_suite(args.suite, args.checkpoint, args.data, args.overrides, args.out)
    if args.out:
        write_json(m, Path(args.out) / "metrics.json")
    print(json.dumps(m, indent=1))
    return 0


def alias(suite: str, section: str, args) -> int:
    """`omni tokenizer eval {image,audio}`: the suite, with keys relative to its section and --out FILE."""
    import json

    from omni.eval.tokenizers import write_json

    full = [o if o.startswith(section + ".") else f"{section}.{o}" for o in args.overrides]  # both forms
    m = run_suite(suite, args.tokenizer, args.data, full)
    if args.out:
        write_json(m, args.out)
    print(json.dumps(m, indent=1))
    return 0
