"""Reading raw media: one extension list per medium, one reader per medium, one shard reader, one skip report.

Everything that turns bytes on disk into pixels, waves or text goes through here: ``omni data
preprocess`` (:mod:`omni.data.samples`), the image and audio tokenizer trainers, the CLI's
``@image:FILE`` prompts. A leaf module: it imports only :mod:`omni.errors` and :mod:`omni.registry`, so
the tokenizer trainers may use it without knowing the vocabulary or the data pipeline.

* :func:`read_image` -> uint8 [H,W,3] RGB (transparency composited onto white, Chameleon's rule);
  :func:`read_audio` -> float32 [C,T] and its sample rate (soundfile: wav, flac, ogg; no ffmpeg);
  :func:`read_text` -> str. Each raises :class:`BadSample` with one of :data:`REASONS`.
* :func:`list_shards` expands shard patterns; :func:`iter_samples` reads one WebDataset shard as
  grouped samples (``{"__key__": KEY, EXT: bytes, ...}``), recording a broken stream as ``corrupt_shard``.
* :func:`iter_media` walks folders, files, shards and named sources (``photos:train``, see
  :data:`SOURCES`) and yields the members of one medium, for the tokenizer trainers.
* :class:`SkipReport` counts what was read, skipped (by reason) and converted.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from omni.errors import OmniError
from omni.registry import Registry

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
"""Image members and files, read with PIL."""
AUDIO_EXTS = ("wav", "flac", "ogg")
"""Audio members and files, read with soundfile."""
UNSUPPORTED_AUDIO_EXTS = ("mp3", "m4a", "aac", "opus", "wma", "webm", "mp4", "amr", "aiff", "aif")
"""Audio formats that would need ffmpeg: counted as ``unsupported_format``, never read."""
TEXT_EXTS = ("txt",)
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
EXTS = {"image": IMAGE_EXTS, "audio": AUDIO_EXTS, "text": TEXT_EXTS}

REASONS = {
    "corrupt_image": "bytes PIL cannot decode (truncated, not an image), or an image under 2 pixels",
    "corrupt_audio": "bytes soundfile cannot decode, an empty, non-finite or silent-only clip",
    "bad_text": "text that is not UTF-8",
    "bad_json": "a .json that does not parse or lacks a valid segments list",
    "missing_member": "a json segment names a member the sample lacks",
    "bad_pair": "a preference sample without valid prompt/chosen/rejected lists, with routing segments, or with "
                "two equal responses",
    "unrecognized_sample": "no member combination of the format",
    "tokenize_error": "a tokenizer refused the content (OmniError or ValueError; anything else stops the run)",
    "corrupt_shard": "the tar stream itself broke; the samples before the break are kept",
    "unsupported_format": "a file of a format that is not read (mp3 needs ffmpeg; a text file among images)",
    "too_small": "an image whose shorter side is under the trainer's min_image_side",
    "unreadable_file": "a file the operating system refuses to read",
}
"""Why a sample or file is skipped (docs/data.md's table)."""


class BadSample(OmniError):
    """A sample (or file) that cannot be used; ``reason`` is one of :data:`REASONS` (readers skip and
    count it; anywhere else it is the user's bad input, exit code 2)."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipReport:
    """What reading found: items read, skipped by reason (with the first few keys), converted by PIL mode."""

    def __init__(self, keep: int = 20):
        self.read = 0
        self.skipped: Counter[str] = Counter()
        self.converted: Counter[str] = Counter()
        self.samples: list[list[str]] = []
        """[key, reason, detail] of the first ``keep`` skips."""
        self.examples: dict[str, str] = {}
        """The first key skipped for each reason."""
        self.keep = keep

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.skipped[reason] += 1
        self.examples.setdefault(reason, key)
        if len(self.samples) < self.keep:
            self.samples.append([key, reason, detail])

    def to_json(self) -> dict:
        return {"read": self.read, "skipped": dict(sorted(self.skipped.items())),
                "converted": dict(sorted(self.converted.items())), "examples": self.examples}

    def __str__(self) -> str:
        s = f"read {self.read}"
        if self.skipped:
            s += "; skipped " + ", ".join(f"{n} {r} (e.g. {self.examples[r]})" for r, n in sorted(self.skipped.items()))
        if self.converted:
            s += "; converted to RGB: " + ", ".join(f"{n} {m}" for m, n in sorted(self.converted.items()))
        return s


# --------------------------------------------------------------------------------------------
# One reader per medium
# --------------------------------------------------------------------------------------------
def pil_to_rgb(im, report: SkipReport | None = None):
    """A PIL image of any mode -> uint8 array [H,W,3] (conversions counted in ``report``).

    The one rule for transparency (Chameleon's): RGBA, LA and palette images with transparency are
    composited onto white; every other mode (L, 1, I;16, CMYK, ...) goes through ``convert('RGB')``.
    """
    import numpy as np
    from PIL import Image as PILImage

    if im.mode != "RGB":
        if report is not None:
            report.converted[im.mode] += 1
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = im.convert("RGBA")
            im = PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def read_image(data: bytes, report: SkipReport | None = None, min_side: int = 2):
    """Encoded image bytes -> uint8 [H,W,3]; :class:`BadSample` ``corrupt_image`` when PIL cannot
    decode them (truncated files fail here, not later) or the shorter side is under ``min_side``."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()
            if min(im.size) < min_side:
                raise BadSample("corrupt_image", f"image of size {im.size} is too small")
            return pil_to_rgb(im, report)
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def read_audio(data: bytes | str | os.PathLike, silence: float = 1e-6):
    """Bytes or a path of a wav/flac/ogg file -> (float32 [C,T], sample rate); :class:`BadSample`
    ``corrupt_audio`` when soundfile cannot decode it, or it is empty, non-finite, or silent
    (peak under ``silence``)."""
    import numpy as np
    import soundfile as sf

    try:
        wave, sr = sf.read(io.BytesIO(data) if isinstance(data, bytes) else str(data), dtype="float32",
                           always_2d=True)  # [T, C]
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for bad files
        raise BadSample("corrupt_audio", f"{type(e).__name__}: {e}") from None
    if wave.shape[0] == 0:
        raise BadSample("corrupt_audio", "empty clip")
    if not np.isfinite(wave).all():
        raise BadSample("corrupt_audio", "non-finite samples")
    if float(np.abs(wave).max()) < silence:
        raise BadSample("corrupt_audio", "silent-only clip")
    return np.ascontiguousarray(wave.T), int(sr)


def read_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", str(e)) from None


# --------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------
def list_shards(inputs: Sequence[str]) -> list[Path]:
    """Shards named directly, by glob, by brace pattern (``data-{000..009}.tar``) or as folders."""
    import glob

    from braceexpand import braceexpand

    shards: list[Path] = []
    missing = []
    for pattern in inputs:
        found = []
        for pat in braceexpand(os.path.expanduser(pattern)):
            for m in sorted(glob.glob(pat, recursive=True)):
                p = Path(m)
                if p.is_dir():
                    found += sorted(q for q in p.rglob("*") if q.name.endswith(SHARD_EXTS))
                else:
                    found.append(p)
        if not found:
            missing.append(pattern)
        shards += found
    if missing:
        raise OmniError(f"no shard matches {', '.join(repr(m) for m in missing)} (expected .tar WebDataset shards)")
    bad = [str(p) for p in shards if not p.name.endswith(SHARD_EXTS)]
    if bad:
        raise OmniError(f"not a tar shard: {', '.join(bad[:5])} (expected {', '.join(SHARD_EXTS)})")
    return sorted(set(shards), key=lambda p: str(p))  # one entry per file, in a fixed order


def tar_end_problem(path: str | os.PathLike) -> str | None:
    """None if an uncompressed tar ends as a whole archive does, else what is wrong.

    A complete tar is a whole number of 512-byte blocks ending in two zero blocks (the end-of-archive
    marker). A copy cut off at a member boundary or inside a header leaves neither, and Python's
    tarfile reads such a stream as a shorter, valid archive; this check catches it. Compressed
    shards carry their own end check (gzip's length and CRC)."""
    path = Path(path)
    if path.name.endswith((".tar.gz", ".tgz")):
        return None
    size = path.stat().st_size
    if size % 512:
        return f"the file is {size} bytes, not whole 512-byte tar blocks (cut off inside a block)"
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if len(tail) < 1024 or tail.strip(b"\0"):
        return "the tar stream ends without its end-of-archive blocks (cut off)"
    return None


def iter_samples(path: str | os.PathLike, report: SkipReport) -> Iterator[dict]:
    """The grouped samples of one shard (members sharing the key before the first dot), in tar order.

    webdataset's own tar iterator and grouping. A broken shard (a tar error, or a stream cut off
    without its end-of-archive blocks: :func:`tar_end_problem`) counts one ``corrupt_shard`` in
    ``report`` and keeps the samples before the break; the sample the break falls in or after is
    left out, since a cut at a member boundary cannot tell whether that sample was whole."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    errors: list[str] = []

    def on_error(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn}")
        return False  # stop reading this shard: the stream is broken

    last = None  # yielded one behind, so the sample at a break can be left out
    with open(path, "rb") as f:
        try:
            files = ({**m, "__url__": str(path)} for m in tar_file_iterator(f, handler=on_error))
            for sample in group_by_keys(files, handler=on_error):
                if last is not None:
                    yield last
                last = sample
        except Exception as e:  # noqa: BLE001 - tarfile errors raised while opening or between members
            errors.append(f"{type(e).__name__}: {e}")
    if not errors and (problem := tar_end_problem(path)) is not None:
        errors.append(problem)
    if errors:
        report.skip("corrupt_shard", Path(path).name, errors[0])
    elif last is not None:
        yield last


# --------------------------------------------------------------------------------------------
# Media files for the tokenizer trainers: folders, files, shards, named sources
# --------------------------------------------------------------------------------------------
SOURCES = Registry("data source", "sources", {"photos": "omni.toy.photos:source"})
"""Named data sources (``NAME:ARG`` in ``--data``): name -> a function ``fn(arg)`` that checks ``arg``
(an OmniError naming the valid ones) and returns an iterator of ``(name, item)`` (item: encoded bytes or
a decoded uint8 [H,W,3] image), or its 'module:function' path, imported on first use (as the
tokenizer registry does)."""


def register_source(name: str, fn: str | Callable) -> None:
    """Make ``NAME:ARG`` a data source; ``fn(arg)`` returns an iterator of ``(name, item)`` pairs."""
    SOURCES.register(name, fn)


def _source(spec: str) -> Iterator[tuple[str, object]]:
    name, _, arg = spec.partition(":")
    return SOURCES.load(name)(arg)


def _is_source(item: str) -> bool:
    return item.partition(":")[0] in SOURCES and ":" in item and not Path(item).exists()


def expand_sources(data: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[str]:
    """``--data`` values -> files, shards and named sources, in a fixed order (folders searched
    recursively, hidden files left out, globs expanded); an OmniError names what is missing."""
    import glob

    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise OmniError(f"no {what} data given")
    out: list[str] = []
    for item in map(str, items):
        if _is_source(item):
            _source(item)  # a named source checks its argument when called, before any reading
            out.append(item)
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise OmniError(f"data glob {item!r} matches no files")
            out.extend(expand_sources(matches, what))
        elif Path(item).is_dir():
            p = Path(item)
            out.extend(str(f) for f in sorted(p.rglob("*"))
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif Path(item).is_file():
            out.append(item)
        else:
            raise OmniError(f"{what} data not found: {item} (give folders, files, .tar shards, globs, or "
                            f"{' / '.join(f'{s}:NAME' for s in sorted(SOURCES))})")
    return out


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in Path(name).name else ""


def iter_media(files: Sequence[str], medium: str, report: SkipReport) -> Iterator[tuple[str, object]]:
    """``(name, item)`` for every ``medium`` ('image' or 'audio') file or shard member of ``files``
    (from :func:`expand_sources`); item is the encoded bytes, or a decoded array from a named source.

    Shard members of other media are left alone (they belong to other modalities); a loose file
    of another kind is counted ``unsupported_format``. Decoding is the caller's (:func:`read_image`,
    :func:`read_audio`), so it can count its own skips.
    """
    exts = EXTS[medium]
    for f in files:
        if _is_source(f):
            yield from _source(f)
        elif f.endswith(SHARD_EXTS):
            for sample in iter_samples(f, report):
                for key, value in sample.items():
                    if not key.startswith("__") and key.rsplit(".", 1)[-1] in exts:  # members 'png', '0.png' 
                        yield f"{f}:{sample['__key__']}.{key}", value
        elif _ext(f) in exts:
            try:
                data = Path(f).read_bytes()
            except OSError as e:
                report.skip("unreadable_file", f, str(e))
                continue
            yield f, data
        elif medium == "image" or _ext(f) in UNSUPPORTED_AUDIO_EXTS:
            report.skip("unsupported_format", f)
