"""`omni tokenizer train audio` and `omni tokenizer eval audio`: the whisper-VQ audio tokenizer."""

from __future__ import annotations

import argparse
import os

DATA_HELP = ("folders of audio files, audio files, or WebDataset .tar shards; several after one flag, or the "
             "flag repeated")
# (one convention for every tokenizer command: `--data a b` and `--data a --data b` both give [a, b])


def register_train(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.commands.tokenizer import TORCHRUN_HELP
    from omni.config import help_text
    from omni.config.audio_tokenizer import AudioTokenizerRecipe

    p = sub.add_parser(
        "audio",
        help="train the whisper-VQ audio tokenizer",
        description="Train the audio tokenizer (whisper log-mel + whisper AudioEncoder + VQ codes, "
        "with a token-to-mel decoder and Griffin-Lim) on wav/flac/ogg files in folders or WebDataset "
        ".tar shards, and write a tokenizer folder that `omni tokenizer bundle --audio DIR` takes. "
        "Empty, silent, corrupt and unsupported files are skipped and counted. An existing run in --out "
        "is resumed (a finished one is left as it is, saying so). "
        + TORCHRUN_HELP.format(modality="audio", key="train.batch_size"),
        epilog=help_text(AudioTokenizerRecipe)
        + "\n(keys are relative to the recipe's tokenizer.audio section)\n\nexample:\n  omni tokenizer train audio --data speech/train --out tok/audio "
        "--config recipes/tokenizers/audio.yaml train.steps=500",
        formatter_class=Formatter,
    )
    p.add_argument("--data", action="extend", nargs="+", required=True, metavar="DIR_OR_SHARDS", help=DATA_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="tokenizer folder to write")
    p.add_argument("--config", metavar="YAML", help="a recipe to start from (its tokenizer.audio section is used)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if --out holds a run (a finished run is otherwise left as it is)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")
    p.set_defaults(func=_train)


def register_eval(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter
    from omni.config import help_text
    from omni.config.eval import AudioEvalConfig

    p = sub.add_parser(
        "audio",
        help="evaluate an audio tokenizer on held-out audio (= omni eval audio-tokenizer)",
        description="Encode and decode every clip of --data and write JSON: mel L1 (and that of an "
        "untrained decoder on the same codes), codebook usage, tokens per second of audio, envelope "
        "correlation between input and decoded wave, and encode/decode real-time factors. The same as "
        "`omni eval audio-tokenizer`, with keys relative to its audio section.",
        epilog=help_text(AudioEvalConfig),
        formatter_class=Formatter,
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="audio tokenizer folder or bundle")
    p.add_argument("--data", action="extend", nargs="+", required=True, metavar="DIR_OR_SHARDS", help=DATA_HELP)
    p.add_argument("--out", metavar="FILE", help="write the JSON here as well as to stdout")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="AudioEvalConfig overrides, see below")
    p.set_defaults(func=_eval)


def _train(args) -> int:
    from omni.cli import split_overrides
    from omni.commands.tokenizer import data_parallel
    from omni.config import load_section
    from omni.run import TrainingStopped
    from omni.tokenizers.audio_train import train_audio_tokenizer

    args.data, extra = split_overrides(args.data)  # nargs="+" swallows trailing key=value pairs
    recipe = load_section("tokenizer.audio", args.config, extra + list(args.overrides))
    with data_parallel(recipe.train.batch_size, "train.batch_size"):
        try:
            tok, summary = train_audio_tokenizer(args.data, recipe, out=args.out, progress=not args.quiet,
                                                 resume=not args.no_resume)
        except TrainingStopped as e:
            return e.exit_code  # the trainer said so, with the checkpoint to resume from
    if summary.get("finished_already") or os.environ.get("RANK", "0") != "0":
        return 0  # the trainer said so, and nothing was written (or rank 0 says what was)
    final = summary["final"]
    figures = (f" (train mel L1 {final['mel_l1']:.4f}, batch codebook usage {final['batch_usage']:.2f})"
               if final else "")
    print(f"wrote {args.out}: {tok} after {summary['steps']} steps in {summary['train_seconds']} s{figures}")
    return 0


def _eval(args) -> int:
    from omni.cli import split_overrides
    from omni.commands.eval import alias

    args.data, extra = split_overrides(args.data)  # nargs="+" swallows trailing key=value pairs
    args.overrides = extra + list(args.overrides)
    return alias("audio-tokenizer", "audio", args)
