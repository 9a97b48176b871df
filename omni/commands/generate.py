"""`omni generate`: interleaved generation from a checkpoint, written as HTML + Markdown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from omni.checkpoint import DTYPES
    from omni.cli import Formatter
    from omni.config import help_text
    from omni.config.generate import GenerateConfig

    p = sub.add_parser(
        "generate",
        help="generate interleaved text/image/audio from a checkpoint",
        description="Continue a prompt (text, optionally an image and/or audio file) with a trained "
        "checkpoint and write OUT.html, OUT.md and OUT_assets/. With --batch, every line of a JSONL "
        'file is one prompt: {"prompt": "...", "image": "a.png", "audio": "b.wav"} (image and audio optional).',
        epilog=help_text(GenerateConfig) + "\n(keys are relative to the recipe's generate section)",
        formatter_class=Formatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder (omni.load)")
    p.add_argument("--prompt", metavar="TEXT", help="prompt text")
    p.add_argument("--image", metavar="FILE", help="an image file after the prompt text")
    p.add_argument("--audio", metavar="FILE", help="a wav/flac/ogg file after the prompt text (and image)")
    p.add_argument("--batch", metavar="JSONL", help="many prompts, one JSON object per line")
    p.add_argument("--out", required=True, metavar="OUT.html", help="the HTML page to write")
    p.add_argument("--config", metavar="YAML", help="a recipe (its generate section is used)")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights on load (default: as saved, float32); "
                   "bfloat16 reads half the bytes per decoding step")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="generation settings, see below")
    p.set_defaults(func=_generate)


def _prompt(text: str | None, image: str | None, audio: str | None):
    from omni.commands.tokenizer import read_audio_file, read_image_file
    from omni.document import Document, Text

    segs = []
    if text:
        segs.append(Text(text))
    if image:
        segs.append(read_image_file(image))
    if audio:
        segs.append(read_audio_file(audio))
    return Document(segs)


def read_batch(path: str):
    from omni.errors import OmniError

    p = Path(path)
    if not p.is_file():
        raise OmniError(f"batch file not found: {p}")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt", ""), str):
                raise ValueError('expected an object like {"prompt": "...", "image": "a.png"}')
            unknown = set(row) - {"prompt", "image", "audio"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}; valid: prompt, image, audio")
        except ValueError as e:
            raise OmniError(f"{p}:{n}: {e}") from None
        base = p.parent
        img = str(base / row["image"]) if row.get("image") else None
        aud = str(base / row["audio"]) if row.get("audio") else None
        prompts.append(_prompt(row.get("prompt"), img, aud))
    if not prompts:
        raise OmniError(f"{p} holds no prompts")
    return prompts


def _generate(args) -> int:
    from omni.checkpoint import load
    from omni.config import load_section
    from omni.errors import OmniError
    from omni.generation.generator import generate
    from omni.generation.page import write_page

    cfg = load_section("generate", args.config, args.overrides)
    if args.batch and (args.prompt or args.image or args.audio):
        raise OmniError("give either --batch or --prompt/--image/--audio, not both")
    if args.batch:
        prompts = read_batch(args.batch)
    else:
        if not (args.prompt or args.image or args.audio):
            raise OmniError("nothing to continue: give --prompt, --image, --audio or --batch")
        prompts = [_prompt(args.prompt, args.image, args.audio)]
    model, tok = load(args.checkpoint, dtype=args.dtype)
    outs = generate(model, tok, prompts, cfg)
    page = write_page(list(zip(prompts, outs)), args.out)
    n_img = sum(len(o.images) for o in outs)
    n_aud = sum(len(o.audios) for o in outs)
    print(f"wrote {page} ({len(outs)} document(s), {n_img} image(s), {n_aud} audio clip(s))")
    return 0
