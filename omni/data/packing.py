"""Training-side data: token datasets, packing into fixed-length sequences, blending, sharding by rank.

* :class:`TokenDataset` reads a folder written by ``omni data preprocess`` (megatron-core's
  ``IndexedDataset`` over each shard) and checks it was made with the model's tokenizer bundle.
* :class:`DocumentPacker` walks a seeded per-epoch shuffle of the documents and packs them into
  sequences of ``seq_len + 1`` tokens (inputs are the first ``seq_len``, labels the last). A
  document that does not fit is split, but never inside an image or audio block: the split moves
  back to just before the block's opener, and the remainder starts the next sequence.
* :class:`BlendedSequences` interleaves several packers by weight with Megatron's deterministic
  blending rule (take the dataset whose share so far lags its weight most), and hands sequence
  ``i`` to data-parallel rank ``i % world``.

Every piece has a ``state_dict`` / ``load_state_dict`` that restores the stream exactly.
Each sequence carries per-token document ids (block-diagonal causal masks) and positions that
restart at every document piece, plus the spans it was cut from, so it can be un-packed. For a
model with an M-RoPE kind (``model.rope.kind`` mrope / mrope_plus: ``mrope=True``) the positions are
3-D, (time, height, width) rows of :func:`omni.rope.mrope_positions` per piece: [3, L] per sequence,
[3, B, L] in a batch (the layout ``OmniDecoder.forward`` takes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni.errors import OmniError


class TokenDataset:
    """The documents of one preprocessed folder, in shard order."""

    def __init__(self, path: str | os.PathLike, tokenizer=None):
        from omni.data import indexed_dataset

        IndexedDataset = indexed_dataset().IndexedDataset

        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise OmniError(f"{self.path} is not a finished token dataset: manifest.json is missing "
                            f"(run `omni data preprocess ... --out {self.path}` until every shard is done)")
        self.manifest = json.loads(mpath.read_text())
        if tokenizer is not None:
            tokenizer.check_compatible(self.manifest["tokenizer"], what=f"the token dataset {self.path}")
        totals = self.manifest["totals"]
        if not totals.get("documents"):
            skipped = ", ".join(f"{n} {r}" for r, n in totals.get("skipped", {}).items()) or "none"
            raise OmniError(f"token dataset {self.path} holds no documents ({totals.get('samples', 0)} samples "
                            f"read, skipped: {skipped}); remove it from data.paths or preprocess other shards")
        self.tokens, self.masks, self._det_files = [], [], []
        self._det: dict[int, dict] = {}  # shard -> its NAME.det.json, read on first use
        for entry in self.manifest["shards"]:
            if not entry["documents"]:  # an empty .bin cannot be memory-mapped; it adds nothing anyway
                continue
            prefix = self.path / "shards" / entry["name"]
            self.tokens.append(IndexedDataset(str(prefix)))
            self.masks.append(IndexedDataset(str(prefix) + ".mask"))
            self._det_files.append(Path(str(prefix) + ".det.json") if entry.get("routed", {}).get("<det>") else None)
        counts = np.array([len(t) for t in self.tokens], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.lengths = (np.concatenate([t.sequence_lengths for t in self.tokens]).astype(np.int64)
                        if len(self.tokens) else np.zeros(0, np.int64))
        self.max_block = int(self.manifest["totals"]["max_block"])
        self.pairs = int(totals.get("pairs", 0))
        """Preference pairs (documents 2i and 2i + 1: prompt + chosen, prompt + rejected); 0: plain documents."""
        if self.pairs and 2 * self.pairs != len(self):
            raise OmniError(f"token dataset {self.path} mixes {self.pairs} preference pairs with "
                            f"{len(self) - 2 * self.pairs} plain documents; preprocess preference samples into a "
                            "folder of their own")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Document ``i``: (ids int64 [T], loss mask uint8 [T])."""
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - int(self._starts[s])
        return self.tokens[s][j].astype(np.int64), self.masks[s][j]

    def det_boxes(self, i: int) -> list[np.ndarray]:
        """The ground-truth boxes of each ``<det>`` of document ``i``, in order: float32 [n, 4] each
        (x0, y0, x1, y1 in [0, 1]; n may be 0); [] for a document without one."""
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        if self._det_files[s] is None:
            return []
        if s not in self._det:
            self._det[s] = json.loads(self._det_files[s].read_text())["documents"]
        routes = self._det[s].get(str(i - int(self._starts[s])), [])
        return [np.asarray(b, np.float32).reshape(-1, 4) for b in routes]


@dataclass
class PackedSequence:
    """One training sequence (``seq_len`` inputs)."""

    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L]: input_ids shifted by one
    loss_mask: np.ndarray  # float32 [L]: 1 where labels[t] is trained on in SFT (prompt segments are 0)
    valid_mask: np.ndarray  # float32 [L]: 1 where labels[t] is a real next token of the same piece (pretraining)
    doc_ids: np.ndarray  # int64 [L]: 0, 1, 2, ... per document piece; -1 on padding
    position_ids: np.ndarray  # int64 [L] (M-RoPE: [3, L]): restart at 0 with every piece
    spans: list[tuple[int, int, int, int, int]]  # (dataset, epoch, document, start, length) per piece, over L+1 tokens


class _Row:
    """One sequence being filled: ``n`` = seq_len + 1 token slots, padding until a piece is put there."""

    def __init__(self, n: int, pad: int, mrope: bool, vocab):
        self.n, self.mrope, self.vocab = n, mrope, vocab
        self.ids = np.full(n, pad, np.int64)
        self.mask = np.zeros(n, np.uint8)
        self.seg = np.full(n, -1, np.int64)
        self.pos = np.zeros((3, n) if mrope else n, np.int64)
        self.spans: list[tuple[int, int, int, int, int]] = []
        self.filled = 0

    def put(self, ids: np.ndarray, mask: np.ndarray, span: tuple[int, int, int, int, int]) -> None:
        """Append a document piece: its positions restart at 0 (pieces never cut a block)."""
        a, b = self.filled, self.filled + len(ids)
        self.ids[a:b], self.mask[a:b], self.seg[a:b] = ids, mask, len(self.spans)
        if self.mrope:
            from omni.rope import mrope_positions

            self.pos[:, a:b] = mrope_positions(ids, self.vocab)[0]
        else:
            self.pos[a:b] = self.vocab.position_ids(len(ids))
        self.spans.append(span)
        self.filled = b

    def sequence(self) -> PackedSequence:
        # Label t is token t+1; it is trained on only inside one piece and where the stored mask says so.
        seg, mask = self.seg, self.mask
        same = (seg[1:] == seg[:-1]) & (seg[1:] >= 0)
        loss_mask = (same & (mask[1:] > 0)).astype(np.float32)
        return PackedSequence(self.ids[:-1], self.ids[1:], loss_mask, same.astype(np.float32), seg[:-1],
                              self.pos[..., :-1], self.spans)


class DocumentPacker:
    """Greedy packing of one dataset's shuffled documents into sequences of ``seq_len + 1`` tokens."""

    def __init__(self, dataset: TokenDataset, seq_len: int, seed: int, vocab, index: int = 0, mrope: bool = False):
        if len(dataset) == 0:
            raise OmniError(f"token dataset {dataset.path} holds no documents")
        # a routed span must end before the row's last token (a label only: the slots must be inputs)
        limit = seq_len if dataset.manifest["totals"].get("routed") else seq_len + 1
        if dataset.max_block > limit:
            raise OmniError(f"seq_len={seq_len} is too short for {dataset.path}: its longest image/audio "
                            f"block or routed span has {dataset.max_block} tokens and they are never split; "
                            f"use seq_len >= {dataset.max_block - (limit - seq_len)}")
        self.ds, self.seq_len, self.seed, self.index = dataset, seq_len, seed, index
        self.vocab = vocab
        self.mrope = mrope  # 3-D positions (omni.rope.mrope_positions) for the M-RoPE kinds
        self.pad = vocab.special("<pad>")
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, self.index, epoch])
            self._order, self._order_epoch = rng.permutation(len(self.ds)), epoch
        return self._order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.offset = int(state["epoch"]), int(state["cursor"]), int(state["offset"])

    def next(self) -> PackedSequence:
        n = self.seq_len + 1
        row = _Row(n, self.pad, self.mrope, self.vocab)
        while row.filled < n:
            filled = row.filled
            doc = int(self.order(self.epoch)[self.cursor])
            d_ids, d_mask = self.ds.document(doc)
            rest = len(d_ids) - self.offset
            room = n - filled
            if rest <= room:
                take = rest
            else:
                ok = self.vocab.split_points(d_ids[self.offset:])[: room + 1]
                take = int(np.flatnonzero(ok)[-1])  # the longest piece that keeps blocks whole
            for s, e in self.vocab.routed_spans(d_ids[self.offset:self.offset + take]):
                if filled + e == n:  # its last token would be the row's last, a label only: cut before it
                    take = s
            if take == 0:  # a block or routed span starts here and does not fit: close this sequence with padding
                break
            a, b = self.offset, self.offset + take
            row.put(d_ids[a:b], d_mask[a:b], (self.index, self.epoch, doc, a, take))
            if b == len(d_ids):
                self.offset = 0
                self.cursor += 1
                if self.cursor == len(self.ds):
                    self.epoch, self.cursor = self.epoch + 1, 0
            else:
                self.offset = b
        return row.sequence()


class PairPacker(DocumentPacker):
    """Packing of a preference dataset (``train.stage=dpo``): whole pairs in a seeded per-epoch
    shuffle, each row holding as many pairs as fit, padding after.

    A pair's two documents (prompt + chosen, prompt + rejected) sit next to each other as pieces
    of their own, chosen first: block-diagonal attention keeps them (and every other pair) apart,
    and each restarts its positions at 0, exactly as if it were alone in the row. A pair is never
    split: a row ends where the next pair does not fit."""

    def __init__(self, dataset: TokenDataset, seq_len: int, seed: int, vocab, index: int = 0, mrope: bool = False):
        super().__init__(dataset, seq_len, seed, vocab, index, mrope)
        if not dataset.pairs:
            raise OmniError(f"{dataset.path} holds plain documents, not preference pairs: train.stage=dpo reads "
                            "datasets preprocessed from prompt/chosen/rejected samples (docs/data.md)")
        self.pair_lengths = dataset.lengths[0::2] + dataset.lengths[1::2]  # [P]
        longest = int(self.pair_lengths.max())
        if longest > seq_len + 1:
            n = int((self.pair_lengths > seq_len + 1).sum())
            raise OmniError(f"data.seq_len={seq_len} is too short for {dataset.path}: {n} of its {dataset.pairs} pairs "
                            f"are longer than a row (the longest: {longest} tokens for both sides; a pair is never "
                            f"split); use data.seq_len >= {longest - 1}")

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, self.index, epoch])
            self._order, self._order_epoch = rng.permutation(self.ds.pairs), epoch
        return self._order

    def next(self) -> PackedSequence:
        row = _Row(self.seq_len + 1, self.pad, self.mrope, self.vocab)
        while row.filled + int(self.pair_lengths[self.order(self.epoch)[self.cursor]]) <= row.n:
            pair = int(self.order(self.epoch)[self.cursor])
            for doc in (2 * pair, 2 * pair + 1):  # chosen, then rejected
                d_ids, d_mask = self.ds.document(doc)
                row.put(d_ids, d_mask, (self.index, self.epoch, doc, 0, len(d_ids)))
            self.cursor += 1
            if self.cursor == self.ds.pairs:
                self.epoch, self.cursor = self.epoch + 1, 0
        return row.sequence()


class BlendedSequences:
    """Sequences from several packers mixed by weight; rank ``r`` of ``world`` gets every world-th one."""

    def __init__(self, packers: list[DocumentPacker], weights: list[float] | None = None,
                 rank: int = 0, world: int = 1):
        if not packers:
            raise OmniError("no token datasets to read (data.paths is empty)")
        w = np.ones(len(packers)) if not weights else np.asarray(weights, np.float64)
        self.weights = w / w.sum()
        self.packers, self.rank, self.world = packers, rank, world
        self.counts = np.zeros(len(packers), np.int64)
        self.index = 0

    def _choose(self) -> int:
        # Megatron's blending: the dataset whose count lags its target share the most (ties: lowest index).
        return int(np.argmax(self.weights * (self.index + 1) - self.counts))

    def _next_global(self) -> PackedSequence:
        k = self._choose()
        seq = self.packers[k].next()
        self.counts[k] += 1
        self.index += 1
        return seq

    def __iter__(self):
        return self

    def __next__(self) -> PackedSequence:
        while True:
            mine = self.index % self.world == self.rank
            seq = self._next_global()
            if mine:
                return seq

    def next_batch(self, batch_size: int) -> dict:
        """``batch_size`` sequences stacked into torch tensors [B, L]; M-RoPE ``position_ids`` [3, B, L]."""
        import torch

        seqs = [next(self) for _ in range(batch_size)]
        # Walk on to the end of this round of the world (every rank's position is then the same global
        # index, so rank 0's state_dict, which a checkpoint keeps, is every rank's). Which sequences a
        # rank gets does not change: its next one is past this round anyway.
        while self.index % self.world:
            self._next_global()
        out = {k: torch.from_numpy(np.stack([getattr(s, k) for s in seqs]))
               for k in ("input_ids", "labels", "loss_mask", "valid_mask", "doc_ids", "position_ids")}
        if out["position_ids"].dim() == 3:  # [B, 3, L] -> [3, B, L]: the model's layout of 3-D positions
            out["position_ids"] = out["position_ids"].transpose(0, 1).contiguous()
        out["spans"] = [s.spans for s in seqs]
        return out

    def det_boxes(self, spans: list[list[tuple]], input_ids, routes) -> list[np.ndarray]:
        """The ground truth of each ``<det>`` route of a batch (``routes``: rows and positions, in order;
        ``spans`` / ``input_ids``: the batch's), float32 [n, 4] each: found through the document piece the
        route lies in and its ordinal among that document's ``<det>`` tokens."""
        out = []
        for r in routes:
            at = 0
            for d, _epoch, doc, start, length in spans[r.row]:
                if at <= r.token < at + length:
                    ds = self.packers[d].ds
                    ids, _ = ds.document(doc)
                    local = start + r.token - at  # the route's index in its document
                    ordinal = int((ids[:local] == int(input_ids[r.row, r.token])).sum())
                    out.append(ds.det_boxes(doc)[ordinal])
                    break
                at += length
            else:  # internal: every input position lies in a piece
                raise AssertionError(f"route at row {r.row} position {r.token} lies in no piece of {spans[r.row]}")
        return out

    def state_dict(self) -> dict:
        return {"index": self.index, "counts": self.counts.tolist(),
                "packers": [p.state_dict() for p in self.packers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["packers"]) != len(self.packers):
            raise OmniError(f"data state has {len(state['packers'])} datasets, this run has {len(self.packers)}")
        self.index = int(state["index"])
        self.counts = np.asarray(state["counts"], np.int64)
        for p, s in zip(self.packers, state["packers"]):
            p.load_state_dict(s)


def build_stream(config, tokenizer, rank: int = 0, world: int = 1, mrope: bool = False,
                 pairs: bool = False, paths=None) -> BlendedSequences:
    """The training stream of a :class:`omni.config.data.DataConfig` (or of ``paths``, with its seed and
    seq_len); ``mrope``: 3-D positions (a model whose ``model.rope.kind`` is an M-RoPE kind); ``pairs``:
    preference pairs (:class:`PairPacker`, train.stage=dpo), which no other stage may read."""
    datasets = [TokenDataset(p, tokenizer) for p in (config.paths if paths is None else paths)]
    for d in datasets:
        if d.pairs and not pairs:
            raise OmniError(f"{d.path} holds preference pairs (prompt + chosen, prompt + rejected): train them with "
                            "train.stage=dpo; another stage would learn the rejected responses too")
    packer = PairPacker if pairs else DocumentPacker
    packers = [packer(d, config.seq_len, config.seed, tokenizer.vocab, index=i, mrope=mrope)
               for i, d in enumerate(datasets)]
    return BlendedSequences(packers, (list(config.weights) or None) if paths is None else None, rank, world)


def unpack(sequences: list[PackedSequence]) -> dict[tuple[int, int, int], np.ndarray]:
    """Reassemble document pieces: {(dataset, epoch, document): its tokens seen so far, in order}."""
    pieces: dict[tuple[int, int, int], list[tuple[int, np.ndarray]]] = {}
    for s in sequences:
        tokens = np.concatenate([s.input_ids, s.labels[-1:]])  # the L+1 packed tokens
        at = 0
        for d, epoch, doc, start, length in s.spans:
            pieces.setdefault((d, epoch, doc), []).append((start, tokens[at : at + length]))
            at += length
    return {k: np.concatenate([t for _, t in sorted(v, key=lambda x: x[0])]) for k, v in pieces.items()}
