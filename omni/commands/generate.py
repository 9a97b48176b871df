"""`omni generate`: interleaved generation from a checkpoint, written as HTML + Markdown."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """\
Continue a prompt (text, images, audio) with a trained checkpoint and write OUT.html, OUT.md and
OUT_assets/. A prompt is a list of segments, as `omni tokenizer encode` takes them: give --prompt
once per segment, in order:
  omni generate --checkpoint runs/a --out out.html --prompt "a photo of" --prompt @image:cat.png
With --batch, every line of a JSONL file is one prompt. For one prompt the text is streamed to
stdout as it is generated, and each image/audio block shows a progress bar on stderr; for a batch
one bar counts the tokens (--quiet: only the final 'wrote ...' line)."""

SETTINGS_HELP = """\
where the settings come from, each layer over the one before:
  1. the defaults listed below;
  2. the checkpoint's own: a training checkpoint (step_XXXXXX/) holds run.yaml, the run's resolved
     config, and its generate section is used (as transformers applies generation_config.json);
     a checkpoint without run.yaml adds nothing;
  3. --config RECIPE: its generate section (only the keys it sets);
  4. key=value on the command line.
Before generating, one line on stderr names every setting that differs from its default and the
layer it came from (--quiet drops it). Keys are relative to the generate section (max_new_tokens=64,
text.temperature=0); the full form (generate.text.temperature=0) works too."""


def register(sub: argparse._SubParsersAction) -> None:
    from omni.checkpoint import DTYPES
    from omni.cli import Formatter
    from omni.commands.tokenizer import SEGMENT_HELP
    from omni.config import help_text
    from omni.config.generate import GenerateConfig

    p = sub.add_parser(
        "generate",
        help="generate interleaved text/image/audio from a checkpoint",
        description=DESCRIPTION,
        epilog=SETTINGS_HELP + "\n\n" + help_text(GenerateConfig),
        formatter_class=Formatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint folder (omni.load), or a training run folder: its newest intact step_* checkpoint")
    p.add_argument("--prompt", action="append", default=[], metavar="SEGMENT",
                   help="one prompt segment; repeat it for several, in order. A segment is " + SEGMENT_HELP)
    p.add_argument("--image", metavar="FILE", help="an image file after the --prompt segments (= --prompt @image:FILE)")
    p.add_argument("--audio", metavar="FILE",
                   help="a wav/flac/ogg file after the --prompt segments and --image (= --prompt @audio:FILE)")
    p.add_argument("--batch", metavar="JSONL",
                   help='many prompts, one JSON object per line: {"prompt": "...", "image": "a.png", "audio": "b.wav"} '
                   '(all optional); "prompt" is one segment or a list of segments in the --prompt syntax '
                   '(["a photo of", "@image:cat.png"]). Relative image and audio paths, in "image", "audio" '
                   "and @image:/@audio: segments, resolve against the JSONL file's folder, not the working directory")
    p.add_argument("--out", required=True, metavar="OUT.html",
                   help="the HTML page to write (must end in .html); OUT.md and OUT_assets/ are written beside it")
    p.add_argument("--config", metavar="YAML", help="a recipe: its generate section goes over the checkpoint's")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights on load (default: as saved, float32); "
                   "bfloat16 reads half the bytes per decoding step")
    p.add_argument("--device", metavar="DEVICE",
                   help="where the model runs: cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the final 'wrote ...' line: no streamed text, progress bars or notes")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="generation settings, see below")
    p.set_defaults(func=_generate)


def _prompt(segments: list[str], image: str | None = None, audio: str | None = None, base: Path | None = None):
    """The prompt Document of ``segments`` (the --prompt syntax), then ``image``, then ``audio``."""
    from omni.commands.tokenizer import parse_segments

    segs = [s for s in segments if s]  # an empty text segment adds nothing
    segs += [f"@image:{image}"] if image else []
    segs += [f"@audio:{audio}"] if audio else []
    return parse_segments(segs, base=base)


def read_batch(path: str):
    """The prompts of a JSONL file; relative file paths resolve against its folder."""
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
            if not isinstance(row, dict):
                raise ValueError('expected an object like {"prompt": "...", "image": "a.png"}')
            unknown = set(row) - {"prompt", "image", "audio"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}; valid: prompt, image, audio")
            segments = row.get("prompt", [])
            segments = [segments] if isinstance(segments, str) else segments
            if not isinstance(segments, list) or not all(isinstance(s, str) for s in segments):
                raise ValueError('"prompt" must be a string or a list of strings (segments: text, '
                                 '"@image:FILE", "@audio:FILE")')
            for key in ("image", "audio"):
                if row.get(key) is not None and not isinstance(row[key], str):
                    raise ValueError(f'"{key}" must be a file path (a string)')
        except ValueError as e:
            raise OmniError(f"{p}:{n}: {e}") from None
        try:
            prompts.append(_prompt(segments, row.get("image"), row.get("audio"), base=p.parent))
        except OmniError as e:
            raise OmniError(f"{p}:{n}: {e}") from None
    if not prompts:
        raise OmniError(f"{p} holds no prompts")
    return prompts


def check_out(out: str) -> Path:
    """The --out page path, refused (OmniError, one line) unless it names an .html file in a folder
    that can be written: checked before the model loads."""
    from omni.errors import OmniError
    from omni.io import check_writable

    p = Path(out)
    if p.suffix.lower() != ".html":
        got = f"its suffix is {p.suffix!r}" if p.suffix else "it has no suffix"
        raise OmniError(f"--out {out}: the page is HTML, so --out must end in .html ({got}); {p.stem}.md and "
                        f"{p.stem}_assets/ are written beside it, for example --out {p.with_suffix('.html')}")
    if p.is_dir():
        raise OmniError(f"--out {out} is a folder; name the page to write in it, for example --out {p / 'page.html'}")
    check_writable(p.parent, f"--out {out}")
    return p


def pick_device(name: str | None) -> str:
    """--device -> the device to load on; refused (naming the valid ones) unless this machine has it."""
    import torch

    from omni.errors import OmniError

    valid = ["cpu"]
    if torch.cuda.is_available():
        valid += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        valid.append("mps")
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = str(torch.device(name))
    except (RuntimeError, ValueError, TypeError):
        raise OmniError(f"--device {name!r} is not a device name; valid on this machine: {', '.join(valid)}") from None
    if dev not in valid:
        raise OmniError(f"--device {name!r} is not available on this machine; valid here: {', '.join(valid)}")
    return dev


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _known(data: dict, cls, path: str = "") -> tuple[dict, list[str]]:
    """``data`` without the keys that config dataclass ``cls`` does not have; and those keys."""
    import dataclasses
    import typing

    types = typing.get_type_hints(cls)
    keep, dropped = {}, []
    for k, v in data.items():
        if k not in types:
            dropped.append(path + k)
            continue
        if dataclasses.is_dataclass(types[k]) and isinstance(v, dict):
            v, more = _known(v, types[k], f"{path}{k}.")
            dropped += more
        keep[k] = v
    return keep, dropped


def _section(path: Path, what: str) -> dict:
    """The raw ``generate`` section of a YAML file ({} when it has none)."""
    import yaml

    from omni.errors import ConfigError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"could not read {what} {path}: {e}") from None
    section = data.get("generate") if isinstance(data, dict) else None
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: generate: expected a mapping of keys, got {section!r}")
    return section


def generate_settings(checkpoint: Path, recipe: str | None, overrides: list[str]):
    """(GenerateConfig, notes): the defaults, under the checkpoint's run.yaml generate section, under
    ``recipe``'s, under ``overrides``; notes are ``key=value (source)`` for every setting that differs
    from its default, and a note per run.yaml key this omni does not know (ignored)."""
    from omni.config import GenerateConfig, load_section, to_dict
    from omni.errors import ConfigError
    from omni.run import RUN_CONFIG

    layers: list[tuple[str, dict]] = []
    notes: list[str] = []
    run_yaml = checkpoint / RUN_CONFIG
    if run_yaml.is_file():
        saved, unknown = _known(_section(run_yaml, "the checkpoint's"), GenerateConfig)
        if unknown:  # written by another omni version: its other settings still apply
            notes.append(f"ignored {', '.join(unknown)} in {run_yaml} (not settings of this omni)")
        try:
            load_section("generate", {"generate": saved})
        except ConfigError as e:
            raise ConfigError(f"{run_yaml}: {e}") from None
        layers.append((str(run_yaml), saved))
    if recipe:
        load_section("generate", recipe)  # the whole recipe checked, its errors naming its keys
        layers.append(("--config", _section(Path(recipe), "the recipe")))
    merged: dict = {}
    for _, layer in layers:
        merged = _merge(merged, layer)
    cfg = load_section("generate", {"generate": merged}, list(overrides))
    cli = {o.split("=", 1)[0].removeprefix("generate.") for o in overrides}
    sources = [(name, set(_flat(layer))) for name, layer in layers] + [("command line", cli)]
    default, final = _flat(to_dict(GenerateConfig())), _flat(to_dict(cfg))
    changed = []
    for key, value in final.items():
        if value != default.get(key):
            src = next((name for name, keys in reversed(sources) if key in keys), "?")
            changed.append(f"{key}={value} ({src})")
    origin = "" if run_yaml.is_file() else f" ({checkpoint} has no {RUN_CONFIG})"
    notes.insert(0, "generate settings: " + (", ".join(changed) + "; the rest default" if changed
                                               else "all default") + origin)
    return cfg, notes


def _generate(args) -> int:
    from omni.checkpoint import load, resolve_checkpoint
    from omni.errors import OmniError
    from omni.generation.generator import generate
    from omni.generation.page import write_page
    from omni.generation.stream import TerminalStream

    def note(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    # everything that can be refused is refused before the model loads
    out = check_out(args.out)
    device = pick_device(args.device)
    if args.batch and (args.prompt or args.image or args.audio):
        raise OmniError("give either --batch or --prompt/--image/--audio, not both")
    if not args.batch and not (args.prompt or args.image or args.audio):
        raise OmniError("nothing to continue: give --prompt, --image, --audio or --batch")
    ckpt = resolve_checkpoint(args.checkpoint)
    if ckpt != Path(args.checkpoint):
        note(f"checkpoint: {ckpt} (the newest intact checkpoint of the run folder {args.checkpoint})")
    cfg, notes = generate_settings(ckpt, args.config, list(args.overrides))
    for n in notes:
        note(n)
    prompts = read_batch(args.batch) if args.batch else [_prompt(args.prompt, args.image, args.audio)]
    model, tok = load(ckpt, dtype=args.dtype, device=device)
    if cfg.compile:
        note("compiling the decoder (first call, about a minute on a CPU)")
    stream = None if args.quiet else TerminalStream(tok, cfg, rows=len(prompts) * cfg.rerank)
    try:
        outs = generate(model, tok, prompts, cfg, on_token=stream.on_token if stream else None)
    finally:
        if stream is not None:
            stream.close()
    page = write_page(list(zip(prompts, outs)), out)
    n_img = sum(len(o.images) for o in outs)
    n_aud = sum(len(o.audios) for o in outs)
    from omni.document import Detect

    dets = [s for o in outs for s in o.segments if isinstance(s, Detect)]
    found = f", {len(dets)} detection(s) with {sum(len(d.boxes) for d in dets)} box(es)" if dets else ""
    print(f"wrote {page} ({len(outs)} document(s), {n_img} image(s), {n_aud} audio clip(s){found})")
    return 0
