"""Documents: the ordered text, image and audio segments a unified tokenizer encodes and decodes.

``omni.Document([omni.Text("a red circle"), omni.Image(pixels), omni.Audio(wave, 16000)])``:
``Image.pixels`` is float [3,H,W] in [0,1] (PIL images and uint8 arrays are converted by
:func:`to_pixels`), ``Audio.wave`` float [T] (multi-channel input averaged to mono).
Reading media files and bytes is :mod:`omni.media`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from omni.errors import OmniError


@dataclass
class Text:
    """A run of text."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise OmniError(f"Text expects a str, got {type(self.text).__name__}")


@dataclass
class Image:
    """An image; ``pixels`` is float [3,H,W] in [0,1]. PIL images and uint8 arrays are converted."""

    pixels: Any

    def __post_init__(self) -> None:
        self.pixels = to_pixels(self.pixels)


@dataclass
class Audio:
    """A mono clip; ``wave`` is float [T]. Multi-channel input [C,T] is averaged to mono."""

    wave: Any
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        import torch

        w = torch.as_tensor(self.wave)
        if w.dim() == 2:  # [C,T] -> [T]
            w = w.float().mean(0)
        if w.dim() != 1:
            raise OmniError(f"Audio expects a wave of shape [T] or [C,T], got {tuple(w.shape)}")
        if not w.is_floating_point():
            w = w.float() / (32768.0 if w.dtype == torch.int16 else 1.0)
        self.wave = w.float()
        if int(self.sample_rate) <= 0:
            raise OmniError(f"Audio sample_rate must be positive, got {self.sample_rate}")
        self.sample_rate = int(self.sample_rate)


Segment = Union[Text, Image, Audio]


@dataclass
class Document:
    """An ordered list of segments. ``dropped`` lists what lenient decoding had to leave out."""

    segments: list[Segment] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def text(self) -> str:
        """All text segments joined."""
        return "".join(s.text for s in self.segments if isinstance(s, Text))

    @property
    def images(self) -> list[Image]:
        return [s for s in self.segments if isinstance(s, Image)]

    @property
    def audios(self) -> list[Audio]:
        return [s for s in self.segments if isinstance(s, Audio)]


def to_pixels(x: Any):
    """PIL image, uint8/float array or tensor ([H,W], [H,W,C] or [C,H,W]) -> float [3,H,W] in [0,1].

    Grayscale is repeated to RGB; transparency is composited onto white (:func:`omni.media.pil_to_rgb`).
    """
    import numpy as np
    import torch
    from PIL import Image as PILImage

    from omni.media import pil_to_rgb

    if isinstance(x, PILImage.Image):
        x = pil_to_rgb(x)
    t = torch.from_numpy(np.array(x)) if not isinstance(x, torch.Tensor) else x  # copy: arrays may be read-only
    if t.dim() == 2:
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
