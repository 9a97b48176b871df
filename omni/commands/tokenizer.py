"""`omni tokenizer ...`: train modality tokenizers, bundle them, encode and decode with a bundle."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

# Modules adding `omni tokenizer train <modality>` (and `eval <modality>`): each has
# `register_train(train_subparsers)` and optionally `register_eval(eval_subparsers)`.
MODALITY_COMMANDS = [
    "omni.commands.tokenizer_text",
    "omni.commands.tokenizer_audio",
    "omni.commands.tokenizer_image",
]


SEGMENT_HELP = ("plain text, or @image:FILE / @audio:FILE for a media file (the whole argument: a file named "
                "inside text is refused, give it as its own segment); text stays text: a typed '<boi>' is those "
                "characters, not the special")
"""The prompt-segment syntax, shared by `omni tokenizer encode` and `omni generate --prompt`."""

MEDIA_PREFIXES = {"@image:": "image", "@audio:": "audio"}

TORCHRUN_HELP = ("Data parallel under torchrun: `python -m omni.parallel.launch --standalone --nproc-per-node N -m omni "
                 "tokenizer train {modality} ...` (gloo, on CPUs) trains the same global batch ({key}, a multiple "
                 "of N) split over N processes; rank 0 writes --out. SIGTERM/SIGUSR1 (Slurm) and Ctrl-C finish "
                 "the step and save a checkpoint; rerunning resumes.")
"""The torchrun paragraph of `omni tokenizer train image|audio --help`."""


@contextlib.contextmanager
def data_parallel(batch_size: int, key: str):
    """The process group of a tokenizer trainer under torchrun (``WORLD_SIZE`` > 1): started by
    :func:`omni.parallel.dist.init_distributed` with gloo (the tokenizer trainers run on CPUs, so
    NCCL has no tensors to reduce even on a GPU machine) and destroyed at the end; nothing in one
    process. The global batch is checked against the world size first, so a batch that does not
    split refuses to start on every rank alike (exit 2) before any rank waits for another."""
    import torch.distributed as dist

    from omni.config.train import ParallelConfig
    from omni.parallel.dist import init_distributed
    from omni.run import check_global_batch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_global_batch(batch_size, world, key)
    started = world > 1 and not dist.is_initialized()
    if started:
        init_distributed(ParallelConfig(dist_backend="gloo"))
    try:
        yield
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter

    p = sub.add_parser("tokenizer", help="train, bundle and use tokenizers", formatter_class=Formatter)
    tsub = p.add_subparsers(dest="tokenizer_cmd", metavar="COMMAND", required=True)

    train = tsub.add_parser("train", help="train a modality tokenizer", formatter_class=Formatter)
    train_sub = train.add_subparsers(dest="modality", metavar="MODALITY", required=True)
    eval_sub = None
    for module in MODALITY_COMMANDS:
        mod = importlib.import_module(module)
        mod.register_train(train_sub)
        if hasattr(mod, "register_eval"):
            if eval_sub is None:
                ev = tsub.add_parser("eval", help="evaluate a modality tokenizer", formatter_class=Formatter)
                eval_sub = ev.add_subparsers(dest="modality", metavar="MODALITY", required=True)
            mod.register_eval(eval_sub)

    b = tsub.add_parser(
        "bundle",
        help="join text, image and audio tokenizers into one unified bundle",
        description="Lay out one id space [text][specials][image][audio] over the given tokenizers "
        "and write vocab.json plus text/, image/, audio/ folders. Each DIR is a tokenizer folder "
        "written by `omni tokenizer train`, or a bundle (its matching folder is taken).",
        formatter_class=Formatter,
    )
    b.add_argument("--text", required=True, metavar="DIR", help="text tokenizer folder or bundle")
    b.add_argument("--image", metavar="DIR", help="image tokenizer folder or bundle")
    b.add_argument("--audio", metavar="DIR", help="audio tokenizer folder or bundle")
    b.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    b.add_argument("--config", metavar="YAML", help="a recipe whose tokenizer section is read")
    b.add_argument("overrides", nargs="*", metavar="key=value",
                   help="keys of the recipe's tokenizer section: n_reserved_specials=N (reserved special ids "
                   "after the named ones, default 16)")
    b.set_defaults(func=_bundle)

    e = tsub.add_parser("encode", help="encode text (and image/audio files) to ids", formatter_class=Formatter)
    e.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer bundle")
    e.add_argument("segments", nargs="*", metavar="SEGMENT",
                   help="the document's segments, in order; each is " + SEGMENT_HELP)
    e.add_argument("--out", metavar="FILE", help="write ids JSON here (default: print to stdout)")
    e.add_argument("--no-bos", action="store_true", help="do not start with <bos>")
    e.set_defaults(func=_encode)

    d = tsub.add_parser("decode", help="decode an ids JSON file back to a document", formatter_class=Formatter)
    d.add_argument("ids", metavar="FILE", help="ids JSON written by `omni tokenizer encode`")
    d.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer bundle")
    d.add_argument("--lenient", action="store_true", help="keep what decodes instead of failing")
    d.set_defaults(func=_decode)


def _bundle(args) -> int:
    from omni.bundle import UnifiedTokenizer
    from omni.config import load_section
    from omni.tokenizers.base import load_tokenizer

    n_reserved = load_section("tokenizer", args.config, list(args.overrides)).n_reserved_specials
    text = load_tokenizer(args.text, "text")
    image = load_tokenizer(args.image, "image") if args.image else None
    audio = load_tokenizer(args.audio, "audio") if args.audio else None
    tok = UnifiedTokenizer.build(text, image, audio, n_reserved_specials=n_reserved)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok}")
    return 0


def parse_segments(segments: list[str], base: str | Path | None = None):
    """Segments in the `@image:FILE` / `@audio:FILE` / plain-text syntax -> omni.Document, in order.

    Each string is one segment: ``@image:FILE`` an image, ``@audio:FILE`` a wav/flac/ogg file, anything
    else text (kept as typed: names like ``<boi>`` are characters, never specials). Relative FILEs
    resolve against ``base`` (a JSONL's folder) when given, else the working directory. A text segment
    that holds ``@image:``/``@audio:`` after a space is refused rather than silently taken as text:
    a file is always its own segment.
    """
    import re

    from omni.document import Document, Text
    from omni.errors import OmniError

    segs = []
    for s in segments:
        kind = next((k for p, k in MEDIA_PREFIXES.items() if s.startswith(p)), None)
        if kind is not None:
            name = s.split(":", 1)[1]
            if not name:
                raise OmniError(f"segment {s!r} names no file: write {s}FILE")
            path = Path(base) / name if base is not None else Path(name)
            segs.append(read_image_file(str(path)) if kind == "image" else read_audio_file(str(path)))
            continue
        inner = re.search(r"(?:^|\s)(@(?:image|audio):\S*)", s)
        if inner:
            head = s[:inner.start(1)].strip()
            raise OmniError(f"segment {s!r} holds {inner.group(1)!r} inside its text: give each file as its own "
                            f"segment, in order (for example {head!r} {inner.group(1)!r})")
        segs.append(Text(s))
    return Document(segs)


def read_image_file(path: str):
    """An image file -> omni.Image, read by omni.media.read_image (RGB; transparency onto white)."""
    from omni.document import Image
    from omni.errors import OmniError
    from omni.media import BadSample, read_image

    try:
        return Image(read_image(_file_bytes(path, "image"), min_side=1))
    except BadSample as e:
        raise OmniError(f"cannot read image {path}: {e.detail}") from None


def read_audio_file(path: str):
    """A wav/flac/ogg file -> omni.Audio, read by omni.media.read_audio (multi-channel averaged to mono)."""
    from omni.document import Audio
    from omni.errors import OmniError
    from omni.media import BadSample, read_audio

    try:
        return Audio(*read_audio(_file_bytes(path, "audio")))
    except BadSample as e:
        raise OmniError(f"cannot read audio {path}: {e.detail} (supported: wav, flac, ogg)") from None


def _file_bytes(path: str, medium: str) -> bytes:
    from omni.errors import OmniError

    p = Path(path)
    if not p.is_file():
        raise OmniError(f"{medium} file not found: {p}")
    return p.read_bytes()


def _encode(args) -> int:
    from omni.bundle import UnifiedTokenizer
    from omni.io import atomic_write_text

    tok = UnifiedTokenizer.load(args.tokenizer)
    ids = tok.encode(parse_segments(args.segments), bos=not args.no_bos)
    out = json.dumps({"ids": ids.tolist(), "tokenizer": tok.identity()})
    if args.out:
        atomic_write_text(args.out, out + "\n")
        print(f"wrote {len(ids)} ids to {args.out}")
    else:
        print(out)
    return 0


def _decode(args) -> int:
    from omni.bundle import UnifiedTokenizer
    from omni.document import Audio, Image, Text
    from omni.errors import OmniError

    p = Path(args.ids)
    if not p.is_file():
        raise OmniError(f"ids file not found: {p}")
    try:
        data = json.loads(p.read_text())
        ids = data["ids"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise OmniError(f"{p} is not an ids file written by `omni tokenizer encode`: {e}") from None
    tok = UnifiedTokenizer.load(args.tokenizer)
    tok.check_compatible(data.get("tokenizer", {}), what=f"the ids in {p}")
    doc = tok.decode(ids, strict=not args.lenient)
    for seg in doc.segments:
        if isinstance(seg, Text):
            print(seg.text)
        elif isinstance(seg, Image):
            print(f"[image {tuple(seg.pixels.shape)}]")
        elif isinstance(seg, Audio):
            print(f"[audio {seg.wave.shape[0] / seg.sample_rate:.2f}s at {seg.sample_rate} Hz]")
    for msg in doc.dropped:
        print(f"dropped: {msg}", file=sys.stderr)
    return 0
