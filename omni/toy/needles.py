"""Long documents of the toy world: needle-in-a-haystack items (text NIAH and V-NIAH), albums and long text.

The haystack is real English that ships offline (:mod:`omni.toy.text`: Python's pydoc topics and
Debian's license texts), cut into sentences, deduplicated and split by **content**
(:func:`sentence_split`, a hash of the sentence), so no validation or test sentence occurs in a
training document. The needles are held out the same way: a magic number's split is a hash of its
digits (:func:`number_split`), and V-NIAH's pictures are toy-world scenes of the asked split
(:func:`omni.toy.shapes.split_of`).

* Text NIAH (LongVA, arXiv 2406.16852, after Kamradt's needle test as LWM runs it): the haystack,
  with the needle sentence "The special magic number is NNNNNNN." at a depth in [0, 1] (the share
  of the haystack before it, at a sentence boundary), then the question; the answer is the seven
  digits.
* V-NIAH (LongVA's, at toy scale): haystack pictures all show one kind of object (one color and
  shape, laid out anew in each picture); the needle picture shows another kind; the question asks
  for the odd one out and the answer names the needle's color and shape (at least three pictures:
  with two, either could be the odd one).
* Albums: many scenes, each picture followed by its caption (a long interleaved document).
* Long text: the haystack alone, scored everywhere (the language-modeling part of a long stage).

Sizes are in tokens of a tokenizer bundle: items are built as ids (:func:`text_item`,
:func:`vision_item`, exact lengths, used by :mod:`omni.eval.niah`) and, for training, as WebDataset
documents in the format of docs/data.md (:func:`write_shards`; the haystack and question are
``prompt`` segments, so only the answer is scored).

``omni data needles OUT --tokenizer DIR --docs N --max-tokens 256`` writes training shards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni.errors import OmniError
from omni.toy.shapes import _png, write_tar_shards

KINDS = ("needle", "vniah", "album", "long_text")
"""Document kinds :func:`write_shards` writes (see the module docstring)."""
SPLITS = ("train", "validation", "test")
"""Content splits of the haystack sentences, the magic numbers and the scenes."""
NEEDLE = "The special magic number is {}."
"""The text needle; ``{}``: seven digits."""
QUESTION = " What is the special magic number? The special magic number is"
"""The text question; the answer, scored, follows it: a space and the digits (then a period in training)."""
VISION_QUESTION = " The odd one out is"
"""The V-NIAH question; the answer: " a red circle" (the needle picture's object). Short, so that three
pictures (the fewest that make an odd one out) and the question fit 256 tokens of the demo's bundle."""
MIN_PICTURES = 3
"""Pictures of a V-NIAH item: with two, either could be the odd one."""
ALBUM_INTRO = "An album:"
"""The first words of an album document."""
TRIES_PER_PAIR = 2000
"""Scene seeds :class:`ScenePool` tries per (color, shape) for its distinct one-object scenes."""
MIN_SENTENCE_CHARS = 20
"""Shorter pieces of the corpus (headings, code fragments) are not haystack sentences."""


def _hash_split(text: str, salt: str) -> str:
    """'validation' for a tenth of the hashes, 'test' for another tenth, else 'train' (as omni.toy.shapes)."""
    h = int.from_bytes(hashlib.sha1(f"{salt}:{text}".encode()).digest()[:8], "big") % 10
    return "validation" if h == 0 else "test" if h == 1 else "train"


def sentence_split(sentence: str) -> str:
    """The split of a haystack sentence: a function of its text alone."""
    return _hash_split(sentence, "sentence")


def number_split(number: str) -> str:
    """The split of a magic number (its seven digits as a string)."""
    return _hash_split(number, "needle")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise OmniError(f"split={split!r} is invalid: choose from {', '.join(SPLITS)}")


@functools.cache
def sentences(split: str) -> tuple[str, ...]:
    """The haystack sentences of ``split``: the corpus's sentences with whitespace collapsed,
    deduplicated, in corpus order."""
    from omni.toy.text import corpus_texts

    _check_split(split)
    out, seen = [], set()
    for text in corpus_texts():
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            s = s.strip()
            if len(s) < MIN_SENTENCE_CHARS or s in seen or "magic number" in s:
                continue
            seen.add(s)
            if sentence_split(s) == split:
                out.append(s)
    return tuple(out)


def magic_number(rng: np.random.Generator, split: str) -> str:
    """Seven digits (first not 0) whose :func:`number_split` is ``split``."""
    _check_split(split)
    while True:
        n = str(int(rng.integers(1_000_000, 10_000_000)))
        if number_split(n) == split:
            return n


@dataclass
class Item:
    """One NIAH item as ids: ``ids[answer_start:answer_end]`` is the answer, scored under teacher forcing."""

    ids: list[int]
    answer_start: int
    answer_end: int
    needle_at: int
    """Index of the needle's first token (the needle picture's opener for V-NIAH)."""
    answer: str
    """The answer's text (the digits; the needle's color and shape)."""
    pictures: list | None = None
    """V-NIAH: the scenes of the pictures, in order."""


def _haystack(tok, n_tokens: int, rng: np.random.Generator, split: str) -> list[list[int]]:
    """Sentences' text ids (each with a leading space), drawn at random from ``split``, until
    ``n_tokens``; the last one cut so the total is exactly ``n_tokens``."""
    pool = sentences(split)
    if not pool:
        raise OmniError(f"the haystack corpus has no {split} sentences")
    out, total = [], 0
    while total < n_tokens:
        ids = tok.encode_text(" " + pool[int(rng.integers(len(pool)))])
        ids = ids[: n_tokens - total]
        out.append(ids)
        total += len(ids)
    return out


def _insert_at(pieces: list[list[int]], depth: float) -> int:
    """The piece boundary (0..len) whose share of the pieces' tokens before it is closest to ``depth``."""
    cum = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    return int(np.argmin(np.abs(cum / max(cum[-1], 1) - depth)))


def check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise OmniError(f"depth={depth} is outside [0, 1] (the share of the haystack before the needle)")


def text_item(tok, length: int, depth: float, rng: np.random.Generator, split: str = "test") -> Item:
    """A text NIAH item of exactly ``length`` ids: ``<bos>``, haystack with the needle at ``depth``,
    the question, the seven answer digits."""
    check_depth(depth)
    number = magic_number(rng, split)
    needle = tok.encode_text(" " + NEEDLE.format(number))
    question = tok.encode_text(QUESTION)
    answer = tok.encode_text(" " + number)
    fixed = 1 + len(needle) + len(question) + len(answer)
    if length < fixed + 1:
        raise OmniError(f"length {length} cannot hold a text NIAH item: the needle, question and answer "
                        f"alone take {fixed} tokens; use lengths >= {fixed + 1}")
    hay = _haystack(tok, length - fixed, rng, split)
    at = _insert_at(hay, depth)
    before = [i for p in hay[:at] for i in p]
    after = [i for p in hay[at:] for i in p]
    ids = [tok.vocab.special("<bos>"), *before, *needle, *after, *question, *answer]
    assert len(ids) == length
    return Item(ids, length - len(answer), length, 1 + len(before), number)


class ScenePool:
    """One-object scenes of ``split`` by (color, shape), drawn at a bundle's image size, their image
    blocks encoded once (an item repeats a few pictures many times)."""

    def __init__(self, tok, split: str = "test", grid: int = 1, per_pair: int = 6, seed: int = 0):
        from omni.toy import shapes

        if tok.image is None:
            raise OmniError("V-NIAH needs a bundle with an image tokenizer")
        _check_split(split)
        self.tok, self.split, self.grid, self.per_pair, self.seed = tok, split, grid, per_pair, seed
        self.size = tok.image.config.image_size
        self.pairs = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES if (c, s) not in shapes.NOVEL_PAIRS]
        self._scenes: dict = {}
        self._blocks: dict = {}

    def scenes(self, pair: tuple[str, str]) -> list:
        """Up to ``per_pair`` distinct one-object scenes of ``pair`` in ``split`` (a small canvas on a
        coarse grid has only a few dozen layouts of one object, a tenth of them in a held-out split)."""
        from omni.toy import shapes

        if pair not in self._scenes:
            found, seen = [], set()
            for k in range(TRIES_PER_PAIR):
                sc = shapes.scene(self.seed * 2**32 + k, n_objects=1, colors=[pair[0]], shapes=[pair[1]],
                                  size=self.size, grid=self.grid)
                key = shapes.scene_key(sc)
                if key not in seen and shapes.split_of(sc) == self.split:
                    seen.add(key)
                    found.append(sc)
                    if len(found) == self.per_pair:
                        break
            if not found:
                raise OmniError(f"no one-object {pair[0]} {pair[1]} scene of split {self.split!r} at {self.size} px, "
                                f"grid {self.grid} in {TRIES_PER_PAIR} draws")
            self._scenes[pair] = found
        return self._scenes[pair]

    def block(self, sc) -> list[int]:
        """The image block ids of scene ``sc`` (opener, codes, closer)."""
        from omni.document import Image

        if sc.seed not in self._blocks:
            self._blocks[sc.seed] = self.tok.encode(Image(sc.image), bos=False).tolist()
        return self._blocks[sc.seed]

    @property
    def block_len(self) -> int:
        return len(self.block(self.scenes(self.pairs[0])[0]))

    def draw(self, rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
        """(haystack pair, needle pair): two different kinds of object."""
        i, j = rng.choice(len(self.pairs), 2, replace=False)
        return self.pairs[int(i)], self.pairs[int(j)]


def _phrase(pair: tuple[str, str]) -> str:
    color, shape = pair
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def vision_item(pool: ScenePool, length: int, depth: float | None, rng: np.random.Generator) -> Item:
    """A V-NIAH item of at most ``length`` ids (as many pictures as fit): ``<bos>``, haystack pictures
    with the needle picture at ``depth`` (its index among them ~ depth x (pictures - 1); None: an index
    drawn uniformly, as training documents have it, so no place is likelier than another), the
    question, the answer naming the needle's object."""
    if depth is not None:
        check_depth(depth)
    tok = pool.tok
    hay_pair, needle_pair = pool.draw(rng)
    answer_text = " " + _phrase(needle_pair)
    question, answer = tok.encode_text(VISION_QUESTION), tok.encode_text(answer_text)
    n = (length - 1 - len(question) - len(answer)) // pool.block_len
    if n < MIN_PICTURES:
        need = 1 + len(question) + len(answer) + MIN_PICTURES * pool.block_len
        raise OmniError(f"length {length} cannot hold a V-NIAH item: {MIN_PICTURES} pictures and the question take "
                        f"{need} tokens; use lengths >= {need}")
    at = int(rng.integers(n)) if depth is None else int(round(depth * (n - 1)))
    hay, needles = pool.scenes(hay_pair), pool.scenes(needle_pair)
    ids, needle_at, pictures = [tok.vocab.special("<bos>")], 0, []
    for k in range(n):
        if k == at:
            needle_at = len(ids)
        sc = needles[int(rng.integers(len(needles)))] if k == at else hay[int(rng.integers(len(hay)))]
        pictures.append(sc)
        ids += pool.block(sc)
    ids += question
    start = len(ids)
    ids += answer
    return Item(ids, start, len(ids), needle_at, answer_text.strip(), pictures)


# ---------------------------------------------------------------------------------------------
# Training documents (WebDataset, docs/data.md)
# ---------------------------------------------------------------------------------------------
def _text(tok, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), strict=False).text


def document(kind: str, tok, max_tokens: int, rng: np.random.Generator, split: str = "train",
             pool: ScenePool | None = None, min_tokens: int | None = None) -> dict:
    """One training sample (``{"json": ..., "N.png": ...}``, no key) of ``kind`` whose ids fit
    ``max_tokens`` (its length drawn in [min_tokens, max_tokens], default [max_tokens / 4, max_tokens])."""
    lo = max_tokens // 4 if min_tokens is None else min_tokens
    length = int(rng.integers(lo, max_tokens + 1))
    depth = float(rng.random())
    if kind == "needle":
        least = 8 + len(tok.encode_text(" " + NEEDLE.format("1234567") + QUESTION + " 1234567"))
        it = text_item(tok, min(max(length, least), max_tokens) - 2, depth, rng, split)  # - 2: the period, a margin
        prompt = _text(tok, it.ids[1:it.answer_start])
        segs = [{"text": prompt, "prompt": True}, {"text": " " + it.answer + "."}]
        return {"json": json.dumps({"segments": segs}).encode()}
    if kind == "long_text":
        hay = _haystack(tok, length - 1, rng, split)
        return {"json": json.dumps({"segments": [{"text": _text(tok, [i for p in hay for i in p]).lstrip()}]}).encode()}
    if pool is None:
        raise OmniError(f"kind {kind!r} needs a ScenePool (a bundle with an image tokenizer)")
    if kind == "vniah":
        longest = max(len(tok.encode_text(" " + _phrase(p))) for p in pool.pairs)
        least = 1 + len(tok.encode_text(VISION_QUESTION)) + longest + MIN_PICTURES * pool.block_len
        it = vision_item(pool, min(max(length, least), max_tokens), None, rng)
        out = {f"{k}.png": _png(sc.image) for k, sc in enumerate(it.pictures)}
        segs = [{"image": f"{k}.png", "prompt": True} for k in range(len(it.pictures))]
        segs += [{"text": VISION_QUESTION, "prompt": True}, {"text": " " + it.answer + "."}]
        return {"json": json.dumps({"segments": segs}).encode(), **out}
    if kind == "album":
        from omni.toy import shapes

        segs, out = [{"text": ALBUM_INTRO}], {}
        used = 1 + len(tok.encode_text(ALBUM_INTRO))
        k = 0
        while True:
            sc = shapes.scene(int(rng.integers(2**31)), size=pool.size, grid=pool.grid)
            if shapes.split_of(sc) != split:
                continue
            cost = pool.block_len + len(tok.encode_text(" " + sc.caption + "."))
            if used + cost > length:
                break
            out[f"{k}.png"] = _png(sc.image)
            segs += [{"image": f"{k}.png"}, {"text": " " + sc.caption + "."}]
            used, k = used + cost, k + 1
        if k == 0:
            raise OmniError(f"max_tokens {max_tokens} cannot hold an album of one picture and its caption")
        return {"json": json.dumps({"segments": segs}).encode(), **out}
    raise OmniError(f"unknown document kind {kind!r}; choose from {', '.join(KINDS)}")


def write_shards(out: str | os.PathLike, tok, n_docs: int, kinds: Sequence[str] = ("needle",), max_tokens: int = 256,
                 min_tokens: int | None = None, split: str = "train", seed: int = 0, grid: int = 1,
                 docs_per_shard: int = 1000, resume: bool = False) -> list[Path]:
    """Write ``n_docs`` documents of each kind in ``kinds`` (:data:`KINDS`) of ``split`` as
    ``out/needles-SPLIT-000.tar`` ..., keys ``SPLIT-KIND-N``; each fits ``max_tokens`` ids of bundle
    ``tok`` (the preprocessor adds ``<bos>``). A shard is written to a temp file and renamed, so
    one that exists is whole; ``resume`` keeps such shards."""

    _check_split(split)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise OmniError(f"document kinds {list(kinds)} are invalid: choose from {', '.join(KINDS)}")
    if n_docs < 1 or docs_per_shard < 1:
        raise OmniError(f"n_docs={n_docs} and docs_per_shard={docs_per_shard} must be >= 1")
    if min_tokens is not None and not 1 <= min_tokens <= max_tokens:
        raise OmniError(f"min_tokens={min_tokens} must be in [1, max_tokens={max_tokens}]")
    pool = ScenePool(tok, split, grid, seed=seed) if tok.image is not None else None
    if pool is None and {"vniah", "album"} & set(kinds):
        raise OmniError("kinds vniah and album need a bundle with an image tokenizer")
    todo = [(kind, i) for i in range(n_docs) for kind in kinds]

    def samples_of(job):
        kind, i = job
        rng = np.random.default_rng([seed, KINDS.index(kind), i])
        return [{"__key__": f"{split}-{kind}-{i}", **document(kind, tok, max_tokens, rng, split, pool, min_tokens)}]

    return write_tar_shards(out, f"needles-{split}", todo, docs_per_shard, resume, samples_of)
