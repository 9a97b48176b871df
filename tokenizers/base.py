"""The small interface every modality tokenizer implements, and the registry that finds them.

A unified tokenizer bundle (:mod:`omni.vocab`) holds one text tokenizer and optionally one image
and one audio tokenizer. Each saves itself into its own folder of the bundle; ``vocab.json``
records its registered ``kind`` and a fingerprint (a hash of its saved files), so ids made with
another tokenizer are refused.

Image tokenizers take and return float images in [0, 1]:
``encode(images [B,3,H,W]) -> codes [B,h,w]`` and ``decode(codes [B,h,w]) -> images [B,3,H,W]``;
the grid ``(h, w)`` is fixed, so an image block always holds ``h*w`` codes.
Audio tokenizers take one mono clip: ``encode(wave [T], sample_rate) -> codes [T']`` and
``decode(codes [T']) -> (wave [T], sample_rate)``; blocks have variable length.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import ClassVar

from omni.errors import OmniError
from omni.io import sha256_bytes, sha256_file
from omni.registry import Registry


def fingerprint_dir(path: str | os.PathLike) -> str:
    """sha256 over the relative names and contents of every file under ``path`` (sorted)."""
    path = Path(path)
    parts = []
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        parts.append(f"{f.relative_to(path).as_posix()}:{sha256_file(f)}")
    return sha256_bytes("\n".join(parts).encode())


def settle_codebooks(module) -> None:
    """Mark lazily initialized codebooks as initialized (vector-quantize-pytorch's k-means init runs
    on the first forward, even in eval mode). Called before encoding outside training, so encoding
    never changes a tokenizer: an untrained one codes with its random codebook, and its codes and
    fingerprint depend on its weights alone, in every process."""
    import torch

    if not hasattr(module, "modules"):  # a tokenizer that holds its network as .model
        module = getattr(module, "model", None)
        if not hasattr(module, "modules"):
            return
    for m in module.modules():
        initted = getattr(m, "initted", None)
        if isinstance(initted, torch.Tensor) and initted.numel() == 1 and not bool(initted):
            initted.fill_(True)


class ModalityTokenizer(abc.ABC):
    """Common part of image and audio tokenizers."""

    kind: ClassVar[str]
    """Registered name recorded in vocab.json (for example 'vq-image')."""
    modality: ClassVar[str]
    """'image' or 'audio'."""

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int:
        """Number of distinct codes; codes are integers in [0, codebook_size)."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write everything needed to rebuild this tokenizer into ``directory``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: str | os.PathLike) -> ModalityTokenizer:
        """Rebuild a tokenizer written by :meth:`save`."""

    def fingerprint(self) -> str:
        """Hash of the files :meth:`save` writes; equal fingerprints mean equal codes."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return fingerprint_dir(tmp)


class ImageTokenizer(ModalityTokenizer):
    modality: ClassVar[str] = "image"

    @property
    @abc.abstractmethod
    def grid(self) -> tuple[int, int]:
        """Code grid ``(h, w)`` of one image; an image block holds ``h*w`` codes."""

    @property
    @abc.abstractmethod
    def image_size(self) -> tuple[int, int]:
        """Pixel size ``(H, W)`` images are resized and center-cropped to before encoding."""

    @abc.abstractmethod
    def encode(self, images):
        """float [B,3,H,W] in [0,1] (already at :attr:`image_size`) -> long codes [B,h,w]."""

    @abc.abstractmethod
    def decode(self, codes):
        """long codes [B,h,w] -> float images [B,3,H,W] in [0,1]."""

    def preprocess(self, pixels):
        """float [3,H,W] in [0,1] of any size -> [3,H',W'] at :attr:`image_size`.

        The one rule for other sizes and aspect ratios: scale so the image covers the target
        (shorter side matches, bicubic with antialiasing), then center-crop the longer side.
        """
        import torch.nn.functional as F

        th, tw = self.image_size
        _, h, w = pixels.shape
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            pixels = F.interpolate(pixels[None].float(), size=(nh, nw), mode="bicubic",
                                   antialias=True, align_corners=False)[0]
            top, left = (nh - th) // 2, (nw - tw) // 2
            pixels = pixels[:, top : top + th, left : left + tw]
        return pixels.clamp(0, 1)

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid
        return h * w


class AudioTokenizer(ModalityTokenizer):
    modality: ClassVar[str] = "audio"

    @property
    @abc.abstractmethod
    def sample_rate(self) -> int:
        """Sample rate clips are resampled to before encoding, and decoded at."""

    @property
    @abc.abstractmethod
    def tokens_per_second(self) -> float:
        """Codes per second of audio."""

    @abc.abstractmethod
    def encode(self, wave, sample_rate: int):
        """float mono wave [T] at ``sample_rate`` -> long codes [T']."""

    @abc.abstractmethod
    def decode(self, codes):
        """long codes [T'] -> (float wave [T], sample_rate)."""


# kind -> "module:Class". Built-in tokenizers are imported only when a bundle names them.
_REGISTRY = Registry("modality tokenizer kind", "registered kinds", {
    "sentencepiece": "omni.tokenizers.text:TextTokenizer",
    "whisper-vq-audio": "omni.tokenizers.audio:WhisperVQAudioTokenizer",
    "hf-tokenizers": "omni.tokenizers.text_hf:HFTextTokenizer",
    "vq-image": "omni.tokenizers.image:VQImageTokenizer",
})


def register(kind: str, cls_or_path: str | type[ModalityTokenizer]) -> None:
    """Make ``kind`` loadable from a bundle; ``cls_or_path`` is a class or 'module:Class'."""
    _REGISTRY.register(kind, cls_or_path)


TOKENIZER_FILE = "tokenizer.json"


def save_tokenizer(tok, directory: str | os.PathLike) -> Path:
    """``tok.save(directory)`` plus ``tokenizer.json`` naming its kind, so :func:`load_tokenizer` finds it."""
    import json

    from omni.io import atomic_write_text

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(d)
    meta = {"kind": tok.kind, "modality": getattr(tok, "modality", "text"), "fingerprint": tok.fingerprint()}
    atomic_write_text(d / TOKENIZER_FILE, json.dumps(meta, indent=1) + "\n")
    return d


def load_tokenizer(directory: str | os.PathLike, modality: str | None = None):
    """Load a tokenizer folder written by :func:`save_tokenizer` (or the matching folder of a bundle)."""
    import json

    d = Path(directory)
    if not d.is_dir():
        raise OmniError(f"tokenizer folder not found: {d}")
    if modality is not None and not (d / TOKENIZER_FILE).is_file() and (d / modality / TOKENIZER_FILE).is_file():
        d = d / modality  # a bundle: take its <modality>/ folder
    path = d / TOKENIZER_FILE
    if not path.is_file():
        raise OmniError(f"{d} holds no tokenizer: {TOKENIZER_FILE} is missing (write it with `omni tokenizer train`)")
    try:
        meta = json.loads(path.read_text())
        kind, found = meta["kind"], meta.get("modality")
    except (json.JSONDecodeError, KeyError) as e:
        raise OmniError(f"{path} is not a valid tokenizer description: {e}") from None
    if modality is not None and found != modality:
        raise OmniError(f"{d} holds the {found} tokenizer, expected the {modality} tokenizer")
    return tokenizer_class(kind).load(d)


def plugin_modules() -> list[str]:
    """Modules outside omni whose tokenizer classes were registered at run time.

    Worker processes import them before loading a bundle, so user-registered kinds work there too.
    """
    return sorted({e.__module__ for e in _REGISTRY.values()
                   if isinstance(e, type) and not e.__module__.startswith("omni.")})


def registered_kinds() -> list[str]:
    return _REGISTRY.names()


def tokenizer_class(kind: str) -> type[ModalityTokenizer]:
    return _REGISTRY.load(kind)
