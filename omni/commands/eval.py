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
        "its images for held-out captions, judged), niah (--checkpoint: any checkpoint; --lengths, --depths, "
        "--kind text|vision: needle-in-a-haystack exact match over length x depth; --out writes metrics.json, "
        "niah.png and index.html), longwrite (--checkpoint: a checkpoint with an image tokenizer; "
        "longwrite.judge=JUDGE_DIR; held-out toy stories of longwrite.steps=[4,5,6,7,8] steps generated greedily, "
        "LongWriter-V's length, quality and overall scores per length; --out writes metrics.json and index.html).",
        epilog=help_text(EvalConfig),
        formatter_class=Formatter,
    )
    p.add_argument("suite", choices=sorted(SUITES), metavar="SUITE", help=f"one of {', '.join(sorted(SUITES))}")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="what to evaluate")
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="evaluation data (folders, files, .tar shards, photos:heldout); repeat for more")
    p.add_argument("--out", metavar="DIR", help="write metrics.json (and the suite's page, if any) here")
    p.add_argument("--lengths", metavar="N,N,...", help="niah: context lengths in tokens (niah.lengths)")
    p.add_argument("--depths", metavar="D,D,...", help="niah: needle depths in [0, 1] (niah.depths)")
    p.add_argument("--kind", choices=("text", "vision"), help="niah: text NIAH or V-NIAH (niah.kind)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="EvalConfig overrides, see below")
    p.set_defaults(func=_eval)


def _niah_flags(args) -> list[str]:
    """--lengths/--depths/--kind as the niah.* overrides they stand for (refused for other suites)."""
    from omni.errors import OmniError

    given = {k: getattr(args, k) for k in ("lengths", "depths", "kind") if getattr(args, k) is not None}
    if given and args.suite != "niah":
        raise OmniError(f"--{'/--'.join(given)} belong to the niah suite, not {args.suite!r}")
    out = [f"niah.kind={given['kind']}"] if "kind" in given else []
    out += [f"niah.{k}=[{given[k]}]" for k in ("lengths", "depths") if k in given]
    return out


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

    m = run_suite(args.suite, args.checkpoint, args.data, _niah_flags(args) + list(args.overrides), args.out)
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
