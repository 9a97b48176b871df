"""The `omni` command: one entry point, subcommand groups.

Building the parser imports nothing heavy; each command imports what it needs when it runs.
A user error (:class:`omni.errors.OmniError`) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

# Subcommand groups: name -> module with `register(subparsers)`. A group is listed once it works.
GROUPS = {
    "tokenizer": "omni.commands.tokenizer",
    "data": "omni.commands.data",
    "train": "omni.commands.train",
    "generate": "omni.commands.generate",
    "convert": "omni.commands.convert",
    "model": "omni.commands.model",
    "eval": "omni.commands.eval",
    "demo": "omni.commands.demo",
    "launch": "omni.commands.launch",
}


class Formatter(argparse.RawDescriptionHelpFormatter):
    pass


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def split_overrides(values: list[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` overrides from a list that argparse filled greedily (``--input a b k=v``)."""
    plain = [v for v in values if not _OVERRIDE.match(v)]
    overrides = [v for v in values if _OVERRIDE.match(v)]
    return plain, overrides


def build_parser() -> argparse.ArgumentParser:
    import omni

    parser = argparse.ArgumentParser(
        prog="omni",
        description="Training and inference for early-fusion any-to-any multimodal models.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"omni {omni.__version__}")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for module in GROUPS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from omni.errors import OmniError

    parser = build_parser()
    # argparse stops filling a trailing `key=value ...` positional at the first option after it
    # (`omni train r.yaml --quiet a=1`); collect such overrides wherever they stand.
    args, extra = parser.parse_known_args(argv)
    overrides, rest = [e for e in extra if _OVERRIDE.match(e)], [e for e in extra if not _OVERRIDE.match(e)]
    if rest or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    try:
        rc = args.func(args)
    except OmniError as e:
        print(f"omni: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omni: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # python -m omni.cli
    sys.exit(main())
