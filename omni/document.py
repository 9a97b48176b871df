"""Documents: the ordered text, image and audio segments a unified tokenizer encodes and decodes.

``omni.Document([omni.Text("a red circle"), omni.Image("circle.png"), omni.Audio("circle.wav")])``:
``Image.pixels`` is float [3,H,W] in [0,1] (files, PIL images and uint8 arrays are converted by
:func:`to_pixels`), ``Audio.wave`` float [T] (multi-channel input averaged to mono). A file path is
read by :mod:`omni.media`'s readers, the ones the CLI uses; ``Image.save`` / ``Audio.save`` write
files back. Reprs are one short line (sizes, durations, truncated text), never tensor values.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from omni.errors import OmniError

TEXT_REPR_CHARS = 60
"""Longer texts are cut to this many characters in a repr."""


def _file_bytes(path: str | os.PathLike, medium: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise OmniError(f"{medium} file not found: {p}")
    return p.read_bytes()


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _numeric_array(x: Any, what: str, accepted: str):
    """``x`` as a tensor when it is a tensor, an array or a (nested) sequence of numbers; else an
    OmniError naming its type and the ``accepted`` ones (a dict or a list of str would otherwise
    fail deep inside numpy or torch)."""
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        return x
    try:
        a = np.array(x)  # a copy: arrays may be read-only
    except Exception:  # noqa: BLE001 - ragged sequences and odd objects raise several types
        a = None
    if a is None or a.dtype.kind not in "biuf":
        held = " not holding numbers" if isinstance(x, (list, tuple)) else ""
        raise OmniError(f"{what} cannot take a {type(x).__name__}{held}; give {accepted}")
    return torch.from_numpy(a)


def _save_bytes(path: str | os.PathLike, data: bytes) -> Path:
    from omni.io import atomic_write_bytes

    p = Path(path)
    if not p.parent.is_dir():
        raise OmniError(f"cannot write {p}: folder {p.parent} does not exist")
    atomic_write_bytes(p, data)
    return p


def _ext(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower().lstrip(".")


@dataclass(repr=False)
class Text:
    """A run of text."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise OmniError(f"Text expects a str, got {type(self.text).__name__}")

    def __repr__(self) -> str:
        if len(self.text) <= TEXT_REPR_CHARS:
            return f"Text({self.text!r})"
        return f"Text({self.text[:TEXT_REPR_CHARS]!r}... {len(self.text)} chars)"


IMAGE_INPUTS = ("a file path (str or os.PathLike), a PIL image, a numpy array or a torch tensor "
                "([H,W], [H,W,C] or [C,H,W], uint8 or float in [0, 1])")


@dataclass(repr=False)
class Image:
    """An image; ``pixels`` is float [3,H,W] in [0,1]. A file path is read with
    :func:`omni.media.read_image` (as the CLI reads one); PIL images and arrays are converted by
    :func:`to_pixels`."""

    pixels: Any

    def __post_init__(self) -> None:
        self.pixels = to_pixels(self.pixels)

    def __repr__(self) -> str:
        return f"Image({'x'.join(str(n) for n in self.pixels.shape)})"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), PIL's order."""
        return int(self.pixels.shape[2]), int(self.pixels.shape[1])

    def to_pil(self):
        """The pixels as an RGB PIL image (uint8: values rounded to the nearest of 256 levels)."""
        import torch
        from PIL import Image as PILImage

        u8 = (self.pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        return PILImage.fromarray(u8.permute(1, 2, 0).numpy(), mode="RGB")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the image to ``path`` (PNG, JPEG, ... by its extension; written whole or not at all)."""
        from omni.media import IMAGE_EXTS

        ext = _ext(path)
        if ext not in IMAGE_EXTS:
            raise OmniError(f"cannot save an image as {path}: unknown extension; valid: {', '.join(IMAGE_EXTS)}")
        fmt = {"jpg": "JPEG", "tif": "TIFF", "pgm": "PPM", "pbm": "PPM"}.get(ext, ext.upper())
        buf = io.BytesIO()
        try:
            self.to_pil().save(buf, format=fmt)
        except (OSError, ValueError) as e:  # e.g. a format PIL reads but cannot write from RGB
            raise OmniError(f"cannot save an image as {path}: {e}") from None
        return _save_bytes(path, buf.getvalue())


AUDIO_INPUTS = ("a file path (str or os.PathLike; wav, flac, ogg), a numpy array or a torch tensor "
                "([T] or [C,T], float or int16)")
DEFAULT_SAMPLE_RATE = 16000
"""The sample rate of a wave given without one."""


@dataclass(repr=False)
class Audio:
    """A mono clip; ``wave`` is float [T]. Multi-channel input [C,T] is averaged to mono.

    A file path is read with :func:`omni.media.read_audio` (as the CLI reads one) and keeps the file's
    sample rate; a ``sample_rate`` that disagrees with the file's is refused rather than resampled
    behind the caller's back. A wave without ``sample_rate`` is taken to be at 16000 Hz."""

    wave: Any
    sample_rate: int | None = None

    def __post_init__(self) -> None:
        import torch

        if _is_path(self.wave):
            from omni.media import BadSample, read_audio

            path = self.wave
            try:
                if not Path(path).is_file():
                    raise OmniError(f"audio file not found: {path}")
                wave, sr = read_audio(path)  # by path: libsndfile's messages then name the file
            except BadSample as e:
                raise OmniError(f"cannot read audio {path}: {e.detail} (supported: wav, flac, ogg)") from None
            if self.sample_rate is not None and int(self.sample_rate) != sr:
                raise OmniError(f"audio file {path} is at {sr} Hz but sample_rate={self.sample_rate} was given: "
                                "drop sample_rate (the file's rate is used) or resample the file")
            self.wave, self.sample_rate = wave, sr
        w = _numeric_array(self.wave, "Audio", AUDIO_INPUTS)
        if w.dim() == 2:  # [C,T] -> [T]
            w = w.float().mean(0)
        if w.dim() != 1:
            raise OmniError(f"Audio expects a wave of shape [T] or [C,T], got {tuple(w.shape)}")
        if not w.is_floating_point():
            w = w.float() / (32768.0 if w.dtype == torch.int16 else 1.0)
        self.wave = w.float()
        if self.sample_rate is None:
            self.sample_rate = DEFAULT_SAMPLE_RATE
        if int(self.sample_rate) <= 0:
            raise OmniError(f"Audio sample_rate must be positive, got {self.sample_rate}")
        self.sample_rate = int(self.sample_rate)

    @property
    def seconds(self) -> float:
        return self.wave.shape[0] / self.sample_rate

    def __repr__(self) -> str:
        return f"Audio({self.seconds:.2f} s at {self.sample_rate} Hz)"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the clip to ``path`` with soundfile: wav or flac (16-bit PCM), ogg (Vorbis), by the
        extension; samples beyond [-1, 1] are clipped (16-bit PCM would wrap them around)."""
        import soundfile as sf

        from omni.media import AUDIO_EXTS

        if _ext(path) not in AUDIO_EXTS:
            raise OmniError(f"cannot save audio as {path}: unknown extension; valid: {', '.join(AUDIO_EXTS)}")
        buf = io.BytesIO()
        sf.write(buf, self.wave.detach().float().cpu().clamp(-1, 1).numpy(), self.sample_rate,
                 format=_ext(path).upper())
        return _save_bytes(path, buf.getvalue())


Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in [0, 1] of the image's width and height (x to the right, y down)."""


@dataclass(repr=False)
class Detect:
    """A ``<det>`` routing token (VisionLLM v2): the detection head finds boxes in the image before it.

    In training data ``boxes`` are the ground truth (``scores`` None; an empty list when the request
    matches nothing); in a generated document, the head's boxes and their scores, highest first.
    ``phrase`` is what was asked, for display ("every red circle"); the request itself is the text
    before the image."""

    boxes: list[Box] = field(default_factory=list)
    scores: list[float] | None = None
    phrase: str = ""

    def __post_init__(self) -> None:
        boxes = []
        for i, b in enumerate(self.boxes):
            try:
                x0, y0, x1, y1 = (float(v) for v in b)
            except (TypeError, ValueError):
                raise OmniError(f"Detect box {i} must be 4 numbers (x0, y0, x1, y1), got {b!r}") from None
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise OmniError(f"Detect box {i} {b!r}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions "
                                "of the image's width and height)")
            boxes.append((x0, y0, x1, y1))
        self.boxes = boxes
        if self.scores is not None and len(self.scores) != len(self.boxes):
            raise OmniError(f"Detect has {len(self.boxes)} boxes but {len(self.scores)} scores")

    def __repr__(self) -> str:
        what = f" {self.phrase!r}" if self.phrase else ""
        return f"Detect({len(self.boxes)} boxes{what})"


@dataclass(repr=False)
class Generate:
    """A ``<gen>`` routing token (VisionLLM v2): the image segment right after it is the one the
    diffusion head makes (in training data, the one it should make; the language model is not
    trained to write its tokens)."""

    def __repr__(self) -> str:
        return "Generate()"


Segment = Union[Text, Image, Audio, Detect, Generate]

MEDIA_SEPARATOR = "\n"
"""What :attr:`Document.text` puts between text runs that an image or audio clip separates."""


@dataclass(repr=False)
class Document:
    """An ordered list of segments. ``dropped`` lists what lenient decoding had to leave out."""

    segments: list[Segment] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        dropped = f", dropped={self.dropped!r}" if self.dropped else ""
        return f"Document([{', '.join(repr(s) for s in self.segments)}]{dropped})"

    @property
    def text(self) -> str:
        """The text segments in order, a newline where an image or audio clip stood between two.

        Text runs are kept as typed (the text tokenizer round-trips them exactly, whitespace
        included); adjacent Text segments join with nothing, as they encode into one run of text
        ids and decode back as one. Between runs a media block separates, plain concatenation would
        glue words ("a red circle" <image> "then a blue square" -> "a red circlethen ..."); a
        newline keeps them apart and marks where the block was.
        """
        parts: list[str] = []
        media_before = False
        for s in self.segments:
            if isinstance(s, Text):
                if media_before and parts:
                    parts.append(MEDIA_SEPARATOR)
                parts.append(s.text)
                media_before = False
            else:
                media_before = True
        return "".join(parts)

    @property
    def images(self) -> list[Image]:
        return [s for s in self.segments if isinstance(s, Image)]

    @property
    def audios(self) -> list[Audio]:
        return [s for s in self.segments if isinstance(s, Audio)]


def to_pixels(x: Any):
    """An image file path, PIL image, uint8/float array or tensor ([H,W], [H,W,C] or [C,H,W]) ->
    float [3,H,W] in [0,1].

    A file is read by :func:`omni.media.read_image`. Grayscale is repeated to RGB; transparency is
    composited onto white (:func:`omni.media.pil_to_rgb`).
    """
    import torch
    from PIL import Image as PILImage

    from omni.media import BadSample, pil_to_rgb, read_image

    # Files and PIL images are [H,W,3] for sure: permute them here, as the shape rule below would
    # take an image 1, 3 or 4 pixels high for [C,H,W].
    known_hwc = _is_path(x) or isinstance(x, PILImage.Image)
    if _is_path(x):
        try:
            x = read_image(_file_bytes(x, "image"), min_side=1)
        except BadSample as e:
            raise OmniError(f"cannot read image {x}: {e.detail}") from None
    elif isinstance(x, PILImage.Image):
        x = pil_to_rgb(x)
    t = _numeric_array(x, "Image", IMAGE_INPUTS)
    if known_hwc:
        t = t.permute(2, 0, 1)
    elif t.dim() == 2:
        t = t[None]
    elif t.dim() == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)  # [H,W,C] -> [C,H,W]
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise OmniError(f"image must be [H,W], [H,W,C] or [C,H,W] with C in 1, 3, 4; got shape {tuple(t.shape)}")
    if t.shape[0] == 4:  # RGBA array: composite onto white, the PIL rule below
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        t = t[:3] * t[3:] + (1 - t[3:])
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.is_floating_point():
        t = t.float()
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise OmniError(f"float image values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        t = t.clamp(0, 1)
    else:
        raise OmniError(f"image dtype {t.dtype} not supported: use uint8 or float in [0, 1]")
    if min(t.shape[1:]) < 1:
        raise OmniError(f"image is empty: shape {tuple(t.shape)}")
    return t.contiguous()
