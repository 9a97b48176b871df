"""`omni tokenizer train text`: SentencePiece BPE on local text files, written as a text-only bundle."""

from __future__ import annotations

import argparse


def register_train(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.config import TextTokenizerConfig, help_text

    p = sub.add_parser(
        "text",
        help="train the SentencePiece BPE text tokenizer",
        description="Train a SentencePiece BPE tokenizer (byte fallback, split digits, lossless) on "
        "the lines of text files, and write a text-only tokenizer bundle that "
        "omni.UnifiedTokenizer.load(DIR) loads.",
        epilog=help_text(TextTokenizerConfig) + "\n  n_reserved_specials  reserved special ids of the bundle (the "
        "recipe's tokenizer.n_reserved_specials, default 16)\n(keys are relative to the recipe's tokenizer.text "
        "section)",
        formatter_class=Formatter,
    )
    # one convention for every tokenizer command: `--input a b` and `--input a --input b` both give [a, b]
    p.add_argument("--input", action="extend", nargs="+", required=True, metavar="FILES_OR_GLOBS",
                   help="text files, folders or globs (quote globs; ** recurses); several after one flag, or "
                   "the flag repeated")
    p.add_argument("--config", metavar="YAML", help="a recipe to start from (its tokenizer.text section is used)")
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from omni.bundle import UnifiedTokenizer
    from omni.cli import split_overrides
    from omni.config import load_section
    from omni.tokenizers.text import train_text_tokenizer

    inputs, extra = split_overrides(args.input)  # `--input a.txt vocab_size=9` also works
    overrides = extra + list(args.overrides)  # the later value wins
    # the bundle's key, relative or in full
    layout = [o for o in overrides if o.split("=", 1)[0] in ("n_reserved_specials", "tokenizer.n_reserved_specials")]
    cfg = load_section("tokenizer.text", args.config, [o for o in overrides if o not in layout])
    n_reserved = load_section("tokenizer", args.config, layout).n_reserved_specials
    text = train_text_tokenizer(inputs, cfg, progress=not args.quiet)
    tok = UnifiedTokenizer.build(text, n_reserved_specials=n_reserved)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok}")
    return 0
