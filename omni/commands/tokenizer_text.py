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
        epilog=help_text(TextTokenizerConfig) + "\n(keys are relative to the recipe's tokenizer.text section)",
        formatter_class=Formatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILES_OR_GLOBS",
                   help="text files, folders or globs (quote globs; ** recurses)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="number of text pieces (config key vocab_size)")
    p.add_argument("--config", metavar="YAML", help="a recipe to start from (its tokenizer.text section is used)")
    p.add_argument("--reserved-specials", type=int, default=16, metavar="N",
                   help="reserved special ids in the bundle (default 16)")
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from omni.bundle import UnifiedTokenizer
    from omni.cli import split_overrides
    from omni.config import load_section
    from omni.errors import OmniError
    from omni.tokenizers.text import train_text_tokenizer

    inputs, extra = split_overrides(args.input)  # `--input a.txt vocab_size=9` also works
    overrides = list(args.overrides) + extra
    if args.vocab_size is not None:
        overrides.append(f"vocab_size={args.vocab_size}")
    if args.reserved_specials < 0:
        raise OmniError(f"--reserved-specials must be >= 0, got {args.reserved_specials}")
    cfg = load_section("tokenizer.text", args.config, overrides)
    text = train_text_tokenizer(inputs, cfg, progress=not args.quiet)
    tok = UnifiedTokenizer.build(text, n_reserved_specials=args.reserved_specials)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok}")
    return 0
