"""The unified vocabulary: one id space for text pieces, specials, image codes and audio codes.

This module is the one place that knows the id layout. The default layout is::

    [text pieces][specials][image codes][audio codes][padding up to a multiple of 128]

and it is data, not code: ``vocab.json`` holds the ranges, the special ids by name and, where a
bundle needs it, an explicit code-to-id table (an imported Chameleon bundle keeps Chameleon's own
ids, whose image codes are scattered inside its BPE vocabulary).

An image block is ``<boi> c_1 ... c_N <eoi>`` with N = h*w fixed by the image tokenizer's grid
(row-major); an audio block is ``<boa> a_1 ... a_M <eoa>`` with M variable. That grammar lives
here once (:meth:`UnifiedVocab.scan`, :meth:`~UnifiedVocab.split_points`,
:meth:`~UnifiedVocab.longest_block`, :meth:`~UnifiedVocab.position_ids`); decoding, packing,
preprocessing and the generation processors all call it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from omni.errors import OmniError

PAD_MULTIPLE = 128

# Modality of each id, as stored in UnifiedVocab.modality_table.
TEXT, SPECIAL, IMAGE, AUDIO, UNUSED = 0, 1, 2, 3, 4
MODALITY_NAMES = ("text", "special", "image", "audio", "unused")

NAMED_SPECIALS = ("<bos>", "<eos>", "<pad>", "<boi>", "<eoi>", "<boa>", "<eoa>", "<det>", "<gen>")
"""Specials every bundle has. <det>/<gen> are the routing tokens (VisionLLM v2)."""
ROUTING_TOKENS = ("<det>", "<gen>")
"""Routing specials: each is followed by its K super-link slots (``SLOT`` ids) in a sequence."""
SLOT = "<pad>"
"""The id written at the K slots after a routing token (omni.decoders.routing replaces their input
embeddings with the head's queries, so the placeholder's own embedding is never used)."""
SUPER_LINK_QUERIES = {"<det>": 4, "<gen>": 64}
"""Default K per routing token (VisionLLM v2's: 4 for detection, 64 for generation)."""
CONTROL_SPECIALS = ("<bos>", "<eos>", "<pad>")
BLOCKS = {"image": ("<boi>", "<eoi>", IMAGE), "audio": ("<boa>", "<eoa>", AUDIO)}
"""Block kind -> (opener, closer, modality of its codes)."""


@dataclass(frozen=True)
class Piece:
    """One piece of an id sequence, as :meth:`UnifiedVocab.scan` reads it.

    ``kind``: 'text' (a run of text ids), 'image' / 'audio' (a block: ``ids[start]`` is its opener,
    its codes are ``ids[start + 1:stop]``, and when ``closed`` ``ids[stop]`` is its closer),
    'special' (a control or routing special outside a block) or 'invalid' (one id that fits
    nowhere; ``problem`` says why).
    """

    kind: str
    start: int
    stop: int
    closed: bool = False
    problem: str = ""

    @property
    def end(self) -> int:
        """One past the piece, closer included."""
        return self.stop + 1 if self.closed else self.stop


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

    # --- the block grammar ------------------------------------------------------------------
    @property
    def openers(self) -> dict[int, str]:
        """Opener id -> block kind."""
        return {self.opener(kind): kind for kind in BLOCKS}

    def opener(self, kind: str) -> int:
        """The id that opens a ``kind`` block ('image' or 'audio')."""
        return self.specials[BLOCKS[kind][0]]

    def closer(self, kind: str) -> int:
        """The id that closes a ``kind`` block."""
        return self.specials[BLOCKS[kind][1]]

    def block(self, kind: str, codes) -> list[int]:
        """The ids of a ``kind`` block holding ``codes`` (long, any shape, row-major): opener, code ids, closer."""
        to_id = self.image_code_to_id if kind == "image" else self.audio_code_to_id
        return [self.opener(kind), *to_id(codes.reshape(-1).long()).tolist(), self.closer(kind)]

    def scan(self, ids: Sequence[int]) -> Iterator[Piece]:
        """Read ``ids`` into :class:`Piece` s, in order: text runs, blocks, specials, invalid ids.

        A block is its opener, then the codes of its modality, then its closer; a block whose codes
        are followed by anything else (or by the end) is yielded unclosed, and reading goes on at
        the id that stopped it.
        """
        seq = [int(i) for i in ids]
        mods, opens = self._modality, self.openers
        closers = {self.closer(k): o for k, (o, _, _) in BLOCKS.items()}
        i, n = 0, len(seq)
        while i < n:
            t = seq[i]
            if not 0 <= t < self.size:
                yield Piece("invalid", i, i + 1, problem=f"id {t} at position {i} is out of range [0, {self.size})")
                i += 1
                continue
            m = mods[t]
            if m == TEXT:
                j = i + 1
                while j < n and 0 <= seq[j] < self.size and mods[seq[j]] == TEXT:
                    j += 1
                yield Piece("text", i, j)
                i = j
            elif t in opens:
                kind = opens[t]
                want = BLOCKS[kind][2]
                j = i + 1
                while j < n and 0 <= seq[j] < self.size and mods[seq[j]] == want:
                    j += 1
                closed = j < n and seq[j] == self.closer(kind)
                yield Piece(kind, i, j, closed)
                i = j + 1 if closed else j
            elif m in (IMAGE, AUDIO):
                yield Piece("invalid", i, i + 1, problem=f"{MODALITY_NAMES[m]} code id {t} at position {i} is outside a block")
                i += 1
            elif m == UNUSED:
                yield Piece("invalid", i, i + 1, problem=f"id {t} at position {i} is a padding id (unused by this vocab)")
                i += 1
            elif t in closers:
                yield Piece("invalid", i, i + 1, problem=f"{closers[t].replace('<b', '<e')} at position {i} closes no block")
                i += 1
            else:  # a control or routing special
                yield Piece("special", i, i + 1)
                i += 1

    def blocks(self, ids: Sequence[int]) -> list[Piece]:
        """The image and audio blocks of ``ids`` (closed or not), in order."""
        return [p for p in self.scan(ids) if p.kind in BLOCKS]

    def routed_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """``[(start, end)]`` of the pieces a routing token binds together, which packing keeps whole:
        ``<det>`` with its slots and the image block before it (the image the head reads), ``<gen>``
        with its slots and the image block right after them (the image the head makes)."""
        import numpy as np

        arr = np.asarray(ids)
        det, gen, slot = self.specials["<det>"], self.specials["<gen>"], self.specials[SLOT]
        routing = np.flatnonzero((arr == det) | (arr == gen))
        if not len(routing):
            return []
        blocks = [b for b in self.blocks(ids) if b.closed]
        spans = []
        for t in routing.tolist():
            i = int(arr[t])
            end = t + 1
            while end < len(arr) and arr[end] == slot:
                end += 1
            start = t
            if i == det:
                before = [b for b in blocks if b.end <= t]
                start = before[-1].start if before else t
            else:
                after = [b for b in blocks if b.start == end]
                end = after[0].end if after else end
            spans.append((start, end))
        return spans

    def split_points(self, ids):
        """bool [T+1] for ids [T]: ``ok[k]`` iff cutting between ``ids[k-1]`` and ``ids[k]`` leaves every
        block and every routed span (:meth:`routed_spans`) whole. A block that is never closed stays open
        to the end: no cut after its opener."""
        import numpy as np

        ok = np.ones(len(ids) + 1, bool)
        for b in self.blocks(ids):
            ok[b.start + 1:b.end if b.closed else None] = False
        for start, end in self.routed_spans(ids):
            ok[start + 1:end] = False
        return ok

    def longest_block(self, ids) -> int:
        """Length of the longest piece packing never splits: a closed image/audio block (opener and
        closer included) or a routed span. The shortest sequence that can hold the document's pieces."""
        pieces = [b.end - b.start for b in self.blocks(ids) if b.closed]
        pieces += [end - start for start, end in self.routed_spans(ids)]
        return max(pieces, default=0)

    @staticmethod
    def position_ids(length: int, start: int = 0):
        """int64 [length]: the positions of a document piece, ``start, start + 1, ...`` (1-D RoPE:
        every token, block codes included, advances the position by one). M-RoPE's 3-D positions
        (image codes by row and column) read this grammar in :func:`omni.rope.mrope_positions`."""
        import numpy as np

        return np.arange(start, start + length, dtype=np.int64)

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


