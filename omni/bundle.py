"""The unified tokenizer: Documents <-> ids in one id space, through the text, image and audio tokenizers.

A bundle folder holds ``vocab.json`` (the :class:`omni.vocab.UnifiedVocab` layout, each
tokenizer's kind and fingerprint, the bundle fingerprint) and one folder per tokenizer
(``text/``, ``image/``, ``audio/``). Artifacts made with a bundle record :meth:`UnifiedTokenizer.identity`;
:meth:`UnifiedTokenizer.check_compatible` refuses them under another bundle and names the tokenizer
that differs. Where blocks start and end is the vocabulary's block grammar (:meth:`UnifiedVocab.scan`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omni.document import Audio, Detect, Document, Generate, Image, Segment, Text
from omni.errors import DecodeError, OmniError, VocabMismatchError
from omni.io import atomic_write_text, read_json, sha256_bytes
from omni.vocab import UnifiedVocab

if TYPE_CHECKING:  # pragma: no cover
    from omni.tokenizers.base import AudioTokenizer, ImageTokenizer
    from omni.tokenizers.text import TextTokenizer

VOCAB_FILE = "vocab.json"
FORMAT_VERSION = 1


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
               return_modality: bool = False, slots: dict[str, int] | None = None):
        """Document -> 1-D LongTensor of ids (and, with ``return_modality``, a uint8 modality per id).

        A :class:`~omni.document.Detect` or :class:`~omni.document.Generate` segment encodes as its
        routing token followed by K slot ids (``omni.vocab.SLOT``), K from ``slots`` (default
        :data:`omni.vocab.SUPER_LINK_QUERIES`); the ground-truth boxes of a Detect are not tokens (the
        preprocessor stores them beside the tokens).
        """
        import torch

        from omni.vocab import SLOT, SUPER_LINK_QUERIES

        slots = {**SUPER_LINK_QUERIES, **(slots or {})}
        if isinstance(doc, str):
            doc = Document([Text(doc)])
        elif isinstance(doc, (Text, Image, Audio, Detect, Generate)):
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
                ids.extend(v.block("image", codes))
            elif isinstance(seg, Audio):
                tok = self._need("audio")
                with torch.no_grad():
                    codes = tok.encode(seg.wave, seg.sample_rate).reshape(-1)
                ids.extend(v.block("audio", codes))
            elif isinstance(seg, (Detect, Generate)):
                name = "<det>" if isinstance(seg, Detect) else "<gen>"
                ids.extend([v.special(name)] + [v.special(SLOT)] * slots[name])
            else:
                raise OmniError(f"unknown segment type {type(seg).__name__}; expected Text, Image, Audio, Detect "
                                "or Generate")
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
        seq = [int(i) for i in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
        routing = (self.vocab.special("<det>"), self.vocab.special("<gen>"))
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

        for piece in self.vocab.scan(seq):  # the block grammar
            if piece.kind == "text":
                text_run.extend(seq[piece.start:piece.stop])
            elif piece.kind == "invalid":
                problem(piece.problem)
            elif piece.kind in ("image", "audio"):
                flush_text()
                codes = seq[piece.start + 1:piece.stop]
                if not piece.closed:
                    got = "the end of the sequence" if piece.stop >= len(seq) else f"id {seq[piece.stop]}"
                    problem(f"{piece.kind} block opened at position {piece.start} is not closed: {got} at "
                            f"position {piece.stop} after {len(codes)} codes")
                elif piece.kind == "image":
                    self._decode_image(codes, piece.start, doc, problem)
                else:
                    self._decode_audio(codes, piece.start, doc, problem)
            elif seq[piece.start] in routing:  # its slots (<pad>) follow as specials: no content
                flush_text()
                doc.segments.append(Detect() if seq[piece.start] == routing[0] else Generate())
            # other specials (control, slots) carry no content
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

