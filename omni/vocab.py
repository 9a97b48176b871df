"""The unified vocabulary: one id space for text pieces, specials, image codes and audio codes.

This module is the one place that knows the id layout. The default layout is::

    [text pieces][specials][image codes][audio codes][padding up to a multiple of 128]

and it is data, not code: ``vocab.json`` holds the ranges, the special ids by name and, where a
bundle needs it, an explicit code-to-id table (an imported Chameleon bundle keeps Chameleon's own
ids, whose image codes are scattered inside its BPE vocabulary).

An image block is ``<boi> c_1 ... c_N <eoi>`` with N = h*w fixed by the image tokenizer's grid
(row-major); an audio block is ``<boa> a_1 ... a_M <eoa>`` with M variable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from omni.errors import DecodeError, OmniError, VocabMismatchError
from omni.io import atomic_write_text, read_json, sha256_bytes

if TYPE_CHECKING:  # pragma: no cover

    from omni.tokenizers.base import AudioTokenizer, ImageTokenizer
    from omni.tokenizers.text import TextTokenizer

VOCAB_FILE = "vocab.json"
FORMAT_VERSION = 1
PAD_MULTIPLE = 128

# Modality of each id, as stored in UnifiedVocab.modality_table.
TEXT, SPECIAL, IMAGE, AUDIO, UNUSED = 0, 1, 2, 3, 4
MODALITY_NAMES = ("text", "special", "image", "audio", "unused")

NAMED_SPECIALS = ("<bos>", "<eos>", "<pad>", "<boi>", "<eoi>", "<boa>", "<eoa>", "<det>", "<gen>")
"""Specials every bundle has. <det>/<gen> are the routing tokens (VisionLLM v2)."""
CONTROL_SPECIALS = ("<bos>", "<eos>", "<pad>")


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------
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


def pil_to_rgb(im):
    """A PIL image of any mode -> uint8 array [H,W,3].

    The one rule for transparency (Chameleon's): RGBA, LA and palette images with transparency are
    composited onto white; every other mode (L, 1, I;16, CMYK, ...) goes through ``convert('RGB')``.
    """
    import numpy as np
    from PIL import Image as PILImage

    if im.mode != "RGB":
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = im.convert("RGBA")
            im = PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def to_pixels(x: Any):
    """PIL image, uint8/float array or tensor ([H,W], [H,W,C] or [C,H,W]) -> float [3,H,W] in [0,1].

    Grayscale is repeated to RGB; transparency is composited onto white (:func:`pil_to_rgb`).
    """
    import numpy as np
    import torch

    try:
        from PIL import Image as PILImage
    except ImportError:  # pragma: no cover
        PILImage = None
    if PILImage is not None and isinstance(x, PILImage.Image):
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


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
@dataclass
class UnifiedVocab:
    """The id layout. Build with :meth:`default`; (de)serialize with :meth:`to_json`/:meth:`from_json`."""

    size: int
    """Total ids, padding included (the embedding and output head have this many rows)."""
    text_size: int
    """Text ids are 0 .. text_size-1 (the text tokenizer's own ids)."""
    specials: dict[str, int]
    """Special token name -> id."""
    image_codes: int = 0
    """Image codebook size (0: no image tokenizer)."""
    image_ids: list[int] | None = None
    """Image code c -> id image_ids[c]; with :attr:`image_offset` unset, this table is the layout."""
    image_offset: int | None = None
    """Image code c -> id image_offset + c (the default contiguous layout)."""
    audio_codes: int = 0
    """Audio codebook size (0: no audio tokenizer)."""
    audio_ids: list[int] | None = None
    audio_offset: int | None = None
    image_grid: tuple[int, int] | None = None
    """(h, w) code grid of one image, recorded so that decoding needs nothing else."""

    def __post_init__(self) -> None:
        self.specials = dict(self.specials)
        missing = [s for s in NAMED_SPECIALS if s not in self.specials]
        if missing:
            raise OmniError(f"vocab lacks the specials {missing}")
        if self.image_grid is not None:
            self.image_grid = tuple(self.image_grid)  # type: ignore[assignment]
        self._tables = None
        table = self.modality_list()  # validates overlaps and ranges
        self._modality = table

    @classmethod
    def default(
        cls,
        text_size: int,
        image_codes: int = 0,
        audio_codes: int = 0,
        n_reserved_specials: int = 16,
        image_grid: tuple[int, int] | None = None,
        pad_multiple: int = PAD_MULTIPLE,
    ) -> UnifiedVocab:
        """[text][specials][image][audio], padded to a multiple of ``pad_multiple``."""
        names = list(NAMED_SPECIALS) + [f"<reserved_{i}>" for i in range(n_reserved_specials)]
        specials = {name: text_size + i for i, name in enumerate(names)}
        image_offset = text_size + len(names)
        audio_offset = image_offset + image_codes
        used = audio_offset + audio_codes
        size = -(-used // pad_multiple) * pad_multiple
        return cls(
            size=size,
            text_size=text_size,
            specials=specials,
            image_codes=image_codes,
            image_offset=image_offset if image_codes else None,
            audio_codes=audio_codes,
            audio_offset=audio_offset if audio_codes else None,
            image_grid=image_grid,
        )

    # --- tables --------------------------------------------------------------------------
    def _code_ids(self, modality: str) -> list[int]:
        n = getattr(self, f"{modality}_codes")
        table = getattr(self, f"{modality}_ids")
        offset = getattr(self, f"{modality}_offset")
        if n == 0:
            return []
        if table is not None:
            if len(table) != n:
                raise OmniError(f"vocab: {modality}_ids has {len(table)} entries, {modality}_codes says {n}")
            return list(table)
        if offset is None:
            raise OmniError(f"vocab: {modality}_codes={n} but neither {modality}_ids nor {modality}_offset is set")
        return list(range(offset, offset + n))

    def modality_list(self) -> list[int]:
        """Modality of every id (TEXT, SPECIAL, IMAGE, AUDIO, UNUSED)."""
        table = [UNUSED] * self.size
        if self.text_size > self.size:
            raise OmniError(f"vocab: text_size {self.text_size} exceeds size {self.size}")
        for i in range(self.text_size):
            table[i] = TEXT
        # Specials, image and audio codes may sit inside the text range (Chameleon keeps its image
        # codes inside its BPE vocab); they take precedence there but must not overlap each other.
        owner: dict[int, str] = {}
        groups = [("special", list(self.specials.values()), SPECIAL),
                  ("image", self._code_ids("image"), IMAGE),
                  ("audio", self._code_ids("audio"), AUDIO)]
        for name, ids, mod in groups:
            for i in ids:
                if not 0 <= i < self.size:
                    raise OmniError(f"vocab: {name} id {i} outside [0, {self.size})")
                if i in owner:
                    raise OmniError(f"vocab: id {i} is both {owner[i]} and {name}")
                owner[i] = name
                table[i] = mod
        return table

    @property
    def modality_table(self):
        """uint8 [size]: the modality of each id."""
        import torch

        if self._tables is None:
            mod = torch.tensor(self._modality, dtype=torch.uint8)
            image_ids = torch.tensor(self._code_ids("image"), dtype=torch.long)
            audio_ids = torch.tensor(self._code_ids("audio"), dtype=torch.long)
            id_to_code = torch.full((self.size,), -1, dtype=torch.long)
            if len(image_ids):
                id_to_code[image_ids] = torch.arange(len(image_ids))
            if len(audio_ids):
                id_to_code[audio_ids] = torch.arange(len(audio_ids))
            self._tables = (mod, image_ids, audio_ids, id_to_code)
        return self._tables[0]

    def _t(self):
        self.modality_table  # noqa: B018 - builds the tables
        return self._tables

    def image_code_to_id(self, codes):
        """long codes (any shape) -> ids."""
        return self._t()[1][codes]

    def audio_code_to_id(self, codes):
        return self._t()[2][codes]

    def id_to_code(self, ids):
        """ids -> image or audio code (-1 for ids that are neither)."""
        return self._t()[3][ids]

    @property
    def n_specials(self) -> int:
        return len(self.specials)

    def special(self, name: str) -> int:
        if name not in self.specials:
            raise OmniError(f"unknown special {name!r}; specials: {', '.join(self.specials)}")
        return self.specials[name]

    # --- (de)serialization ---------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "size": self.size,
            "text_size": self.text_size,
            "specials": self.specials,
            "image_codes": self.image_codes,
            "image_offset": self.image_offset,
            "image_ids": self.image_ids,
            "image_grid": list(self.image_grid) if self.image_grid else None,
            "audio_codes": self.audio_codes,
            "audio_offset": self.audio_offset,
            "audio_ids": self.audio_ids,
        }

    @classmethod
    def from_json(cls, data: dict) -> UnifiedVocab:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise OmniError(f"vocab layout has unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
class UnifiedTokenizer:
    """Documents <-> ids in the unified id space, through the text, image and audio tokenizers."""

    def __init__(
        self,
        vocab: UnifiedVocab,
        text: TextTokenizer | None = None,
        image: ImageTokenizer | None = None,
        audio: AudioTokenizer | None = None,
        text_missing_reason: str | None = None,
    ):
        self.vocab = vocab
        self.text = text
        self.image = image
        self.audio = audio
        self._text_missing_reason = text_missing_reason
        if text is not None and text.vocab_size != vocab.text_size:
            raise VocabMismatchError(
                f"text tokenizer has {text.vocab_size} pieces but the vocab's text range holds {vocab.text_size}"
            )
        for name, tok, n in (("image", image, vocab.image_codes), ("audio", audio, vocab.audio_codes)):
            if tok is not None and tok.codebook_size != n:
                raise VocabMismatchError(
                    f"{name} tokenizer has {tok.codebook_size} codes but the vocab's {name} range holds {n}"
                )
            if tok is None and n:
                raise OmniError(f"vocab has {n} {name} codes but no {name} tokenizer was given")
        from omni.tokenizers.base import settle_codebooks

        for tok in (image, audio):  # a bundle's tokenizers are final: encoding must not change them
            if tok is not None:
                settle_codebooks(tok)
        if image is not None and vocab.image_grid is not None and tuple(image.grid) != tuple(vocab.image_grid):
            raise VocabMismatchError(f"image tokenizer grid {image.grid} != vocab image_grid {vocab.image_grid}")
        self.components = self._components()

    @classmethod
    def build(
        cls,
        text: TextTokenizer,
        image: ImageTokenizer | None = None,
        audio: AudioTokenizer | None = None,
        n_reserved_specials: int = 16,
    ) -> UnifiedTokenizer:
        """A bundle in the default layout from its modality tokenizers."""
        vocab = UnifiedVocab.default(
            text_size=text.vocab_size,
            image_codes=image.codebook_size if image is not None else 0,
            audio_codes=audio.codebook_size if audio is not None else 0,
            n_reserved_specials=n_reserved_specials,
            image_grid=tuple(image.grid) if image is not None else None,
        )
        return cls(vocab, text, image, audio)

    # --- identity ------------------------------------------------------------------------
    def _components(self) -> dict[str, dict]:
        comps = {}
        for name in ("text", "image", "audio"):
            tok = getattr(self, name)
            if tok is not None:
                comps[name] = {"kind": tok.kind, "fingerprint": tok.fingerprint()}
        return comps

    @property
    def fingerprint(self) -> str:
        """sha256 of the layout and each tokenizer's fingerprint: equal iff ids mean the same."""
        blob = json.dumps({"layout": self.vocab.to_json(), "tokenizers": self.components}, sort_keys=True)
        return sha256_bytes(blob.encode())

    def identity(self) -> dict:
        """What artifacts made with this bundle record (checkpoints, token datasets, id files)."""
        return {"fingerprint": self.fingerprint, "tokenizers": self.components, "vocab_size": self.vocab.size}

    def check_compatible(self, recorded: dict | str, what: str = "these ids") -> None:
        """Refuse ``what`` unless it was made with this bundle; the message says what differs."""
        if isinstance(recorded, str):
            recorded = {"fingerprint": recorded}
        fp = recorded.get("fingerprint")
        if fp == self.fingerprint:
            return
        diffs = []
        theirs = recorded.get("tokenizers")
        if theirs is not None:
            for name in ("text", "image", "audio"):
                a, b = theirs.get(name), self.components.get(name)
                if a != b:
                    desc = lambda c: "none" if c is None else f"{c['kind']} {c['fingerprint'][:12]}"  # noqa: E731
                    diffs.append(f"{name} tokenizer {desc(a)} vs {desc(b)}")
            if not diffs:
                diffs.append(f"id layout (vocab size {recorded.get('vocab_size')} vs {self.vocab.size})")
        detail = "; ".join(diffs) if diffs else f"fingerprint {str(fp)[:12]} vs {self.fingerprint[:12]}"
        raise VocabMismatchError(f"{what} were made with another tokenizer bundle: {detail}")

    # --- encode --------------------------------------------------------------------------
    def _need(self, name: str):
        tok = getattr(self, name)
        if tok is None:
            reason = self._text_missing_reason if name == "text" else None
            raise OmniError(reason or f"this tokenizer bundle has no {name} tokenizer")
        return tok

    def encode_text(self, text: str) -> list[int]:
        """Text -> global ids (never specials: a typed '<boi>' stays text)."""
        return list(self._need("text").encode(text))

    def encode(self, doc: Document | Segment | str, bos: bool = True, eos: bool = False,
               return_modality: bool = False):
        """Document -> 1-D LongTensor of ids (and, with ``return_modality``, a uint8 modality per id)."""
        import torch

        if isinstance(doc, str):
            doc = Document([Text(doc)])
        elif isinstance(doc, (Text, Image, Audio)):
            doc = Document([doc])
        if not isinstance(doc, Document):
            raise OmniError(f"encode expects a Document, a segment or a str, got {type(doc).__name__}")
        v = self.vocab
        ids: list[int] = [v.special("<bos>")] if bos else []
        for seg in doc.segments:
            if isinstance(seg, Text):
                ids.extend(self.encode_text(seg.text))
            elif isinstance(seg, Image):
                tok = self._need("image")
                pixels = tok.preprocess(seg.pixels)[None]  # [1,3,H,W]
                with torch.no_grad():
                    codes = tok.encode(pixels)[0].reshape(-1)  # [h*w], row-major
                ids.append(v.special("<boi>"))
                ids.extend(v.image_code_to_id(codes.long()).tolist())
                ids.append(v.special("<eoi>"))
            elif isinstance(seg, Audio):
                tok = self._need("audio")
                with torch.no_grad():
                    codes = tok.encode(seg.wave, seg.sample_rate).reshape(-1)
                ids.append(v.special("<boa>"))
                ids.extend(v.audio_code_to_id(codes.long()).tolist())
                ids.append(v.special("<eoa>"))
            else:
                raise OmniError(f"unknown segment type {type(seg).__name__}; expected Text, Image or Audio")
        if eos:
            ids.append(v.special("<eos>"))
        out = torch.tensor(ids, dtype=torch.long)
        return (out, self.modality(out)) if return_modality else out

    def modality(self, ids):
        """uint8 tensor of the same shape: TEXT, SPECIAL, IMAGE, AUDIO or UNUSED per id."""
        import torch

        ids = torch.as_tensor(ids, dtype=torch.long)
        return self.vocab.modality_table[ids]

    # --- decode --------------------------------------------------------------------------
    def decode(self, ids: Sequence[int] | Any, strict: bool = True) -> Document:
        """ids -> Document.

        Strict mode raises :class:`DecodeError` at the first malformed part (an id out of range,
        an image block of the wrong length, an unclosed block, a code outside a block). Lenient
        mode (``strict=False``) keeps what decodes and lists what it dropped in ``Document.dropped``.
        """
        v = self.vocab
        seq = [int(i) for i in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
        mods = v._modality
        sp = v.specials
        boi, eoi, boa, eoa = sp["<boi>"], sp["<eoi>"], sp["<boa>"], sp["<eoa>"]
        doc = Document()
        text_run: list[int] = []

        def problem(msg: str) -> None:
            if strict:
                raise DecodeError(msg)
            doc.dropped.append(msg)

        def flush_text() -> None:
            if text_run:
                if self.text is None:
                    problem(f"{len(text_run)} text ids dropped: the bundle has no text tokenizer")
                else:
                    s = self.text.decode(text_run)
                    if doc.segments and isinstance(doc.segments[-1], Text):
                        doc.segments[-1].text += s
                    else:
                        doc.segments.append(Text(s))
                text_run.clear()

        i, n = 0, len(seq)
        while i < n:
            t = seq[i]
            if not 0 <= t < v.size:
                problem(f"id {t} at position {i} is out of range [0, {v.size})")
                i += 1
                continue
            m = mods[t]
            if m == TEXT:
                text_run.append(t)
                i += 1
            elif t in (boi, boa):
                flush_text()
                name, want, close = ("image", IMAGE, eoi) if t == boi else ("audio", AUDIO, eoa)
                j = i + 1
                while j < n and 0 <= seq[j] < v.size and mods[seq[j]] == want:
                    j += 1
                codes = seq[i + 1 : j]
                closed = j < n and seq[j] == close
                if not closed:
                    got = "the end of the sequence" if j >= n else f"id {seq[j]}"
                    problem(f"{name} block opened at position {i} is not closed: {got} at position {j} after {len(codes)} codes")
                    i = j
                    continue
                if name == "image":
                    self._decode_image(codes, i, doc, problem)
                else:
                    self._decode_audio(codes, i, doc, problem)
                i = j + 1
            elif m in (IMAGE, AUDIO):
                problem(f"{MODALITY_NAMES[m]} code id {t} at position {i} is outside a block")
                i += 1
            elif m == UNUSED:
                problem(f"id {t} at position {i} is a padding id (unused by this vocab)")
                i += 1
            else:  # <eoi>/<eoa> without an opener, or a control / routing special
                if t in (eoi, eoa):
                    problem(f"{'<eoi>' if t == eoi else '<eoa>'} at position {i} closes no block")
                i += 1
        flush_text()
        return doc

    def _decode_image(self, codes_ids: list[int], pos: int, doc: Document, problem) -> None:
        import torch

        tok = self.image
        if tok is None:
            problem(f"image block at position {pos} dropped: the bundle has no image tokenizer")
            return
        h, w = self.vocab.image_grid or tok.grid
        if len(codes_ids) != h * w:
            problem(f"image block at position {pos} has {len(codes_ids)} codes; an image needs exactly {h * w} ({h}x{w})")
            return
        codes = self.vocab.id_to_code(torch.tensor(codes_ids)).reshape(1, h, w)
        with torch.no_grad():
            pixels = tok.decode(codes)[0]
        doc.segments.append(Image(pixels.clamp(0, 1)))

    def _decode_audio(self, codes_ids: list[int], pos: int, doc: Document, problem) -> None:
        import torch

        tok = self.audio
        if tok is None:
            problem(f"audio block at position {pos} dropped: the bundle has no audio tokenizer")
            return
        if not codes_ids:
            problem(f"audio block at position {pos} is empty")
            return
        codes = self.vocab.id_to_code(torch.tensor(codes_ids))
        with torch.no_grad():
            wave, sr = tok.decode(codes)
        doc.segments.append(Audio(wave, sr))

    # --- persistence ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle: vocab.json plus text/, image/, audio/ folders."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        from omni.tokenizers.base import save_tokenizer

        for name in ("text", "image", "audio"):
            tok = getattr(self, name)
            if tok is not None:
                save_tokenizer(tok, d / name)
        meta = {
            "format": FORMAT_VERSION,
            "layout": self.vocab.to_json(),
            "tokenizers": self.components,
            "fingerprint": self.fingerprint,
        }
        if self.text is None and self._text_missing_reason:
            meta["text_missing_reason"] = self._text_missing_reason
        atomic_write_text(d / VOCAB_FILE, json.dumps(meta, indent=1) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UnifiedTokenizer:
        """Load a bundle written by :meth:`save`; each tokenizer's fingerprint is checked."""
        from omni.tokenizers.base import load_tokenizer

        d = Path(directory)
        meta = read_json(d / VOCAB_FILE, f"{d} is not a tokenizer bundle: {VOCAB_FILE} is missing",
                         FORMAT_VERSION, "bundle")
        vocab = UnifiedVocab.from_json(meta["layout"])
        recorded = meta.get("tokenizers", {})
        loaded: dict[str, Any] = {}
        for name, info in recorded.items():
            tok = load_tokenizer(d / name, modality=name)
            fp = tok.fingerprint()
            if fp != info["fingerprint"]:
                raise VocabMismatchError(
                    f"{d / name}: {name} tokenizer files changed since the bundle was made "
                    f"(fingerprint {fp[:12]}, vocab.json records {info['fingerprint'][:12]})"
                )
            loaded[name] = tok
        return cls(vocab, text_missing_reason=meta.get("text_missing_reason"), **loaded)

    def __repr__(self) -> str:
        parts = [f"vocab_size={self.vocab.size}", f"text={self.vocab.text_size}"]
        if self.image is not None:
            parts.append(f"image={self.vocab.image_codes}x{self.vocab.image_grid}")
        if self.audio is not None:
            parts.append(f"audio={self.vocab.audio_codes}")
        return f"UnifiedTokenizer({', '.join(parts)}, fingerprint={self.fingerprint[:12]})"

