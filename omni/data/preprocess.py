"""`omni data preprocess`: raw WebDataset shards -> Megatron indexed token datasets + a manifest.

Output folder::

    DIR/shards/NAME.bin, NAME.idx            token ids (int32), one sequence per document
    DIR/shards/NAME.mask.bin, NAME.mask.idx  per-token loss mask (uint8; 0 on prompt segments)
    DIR/shards/NAME.det.json                 ground-truth boxes of each <det>, by document (only if any)
    DIR/shards/NAME.json                     that shard's counts; written last = the shard is done
    DIR/manifest.json                        all shards, totals, tokenizer identity (once all are done)

The .bin/.idx pair is megatron-core's ``IndexedDataset`` format (its builder and reader run on a
CPU), so Megatron-LM tools read the tokens as they are. Work is split by shard: input shard i
belongs to rank ``i % world``, so a Slurm array spreads one preprocessing job over many nodes.
Every output file is written to a temp name and renamed, and a shard counts as done only when its
``NAME.json`` exists, so a killed run resumes by skipping finished shards, and the result is
byte-identical to an uninterrupted run (no timestamps, a fixed order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from omni.config.data import PreprocessConfig
from omni.errors import OmniError
from omni.io import atomic_write_text, remove_stale_temps

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def shard_name(index: int, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name.split(".")[0])
    return f"{index:05d}-{stem}"


def encode_sample(tok, parsed, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, list[list]]:
    """A parsed sample -> (ids int32 [T], loss mask uint8 [T], the ground-truth boxes of each ``<det>``
    in order); prompt segments get mask 0; routing segments get their K slots (``cfg.det_queries``,
    ``cfg.gen_queries``)."""
    from omni.document import Detect, Document
    from omni.media import BadSample

    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    v = tok.vocab
    if cfg.add_bos:
        ids.append(np.array([v.special("<bos>")], np.int32))
        mask.append(np.zeros(1, np.uint8))  # never a target
    slots = {"<det>": cfg.det_queries, "<gen>": cfg.gen_queries}
    boxes = [[list(b) for b in seg.boxes] for seg in parsed.doc.segments if isinstance(seg, Detect)]
    for seg, prompt in zip(parsed.doc.segments, parsed.prompt):
        try:
            seg_ids = tok.encode(Document([seg]), bos=False, slots=slots).numpy().astype(np.int32)
        except (OmniError, ValueError) as e:  # the tokenizer refused this content: skip the sample
            raise BadSample("tokenize_error", f"{type(e).__name__}: {e}") from None
        # any other exception is a bug, not bad data: it stops the run (process_shard names the sample)
        ids.append(seg_ids)
        mask.append(np.full(len(seg_ids), 0 if prompt else 1, np.uint8))
    if cfg.add_eos:
        ids.append(np.array([v.special("<eos>")], np.int32))
        mask.append(np.ones(1, np.uint8))
    return np.concatenate(ids), np.concatenate(mask), boxes


def process_shard(path: Path, name: str, out: Path, tok, cfg: PreprocessConfig) -> dict:
    """Tokenize one shard into ``out/shards/NAME.*``; returns (and writes) its manifest entry."""
    from omni.data import indexed_dataset
    from omni.data.samples import ParsedSample, is_pair, parse_pair, parse_sample
    from omni.document import Document
    from omni.media import BadSample, SkipReport, iter_samples
    from omni.vocab import MODALITY_NAMES

    IndexedDatasetBuilder = indexed_dataset().IndexedDatasetBuilder

    shard_dir = out / "shards"
    tmp_dir = out / ".tmp"
    shard_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = {k: tmp_dir / f"{name}{k}" for k in (".bin", ".idx", ".mask.bin", ".mask.idx")}
    tokens_b = IndexedDatasetBuilder(str(tmp[".bin"]), dtype=np.int32)
    mask_b = IndexedDatasetBuilder(str(tmp[".mask.bin"]), dtype=np.uint8)
    table = tok.vocab.modality_table.numpy()

    report = SkipReport(keep=cfg.log_skipped)
    per_modality = np.zeros(len(MODALITY_NAMES), np.int64)
    n_samples = n_docs = n_pairs = max_block = 0
    det_boxes: dict[str, list] = {}  # document index in the shard -> per <det>, its boxes
    routed = Counter()
    for sample in iter_samples(path, report):
        n_samples += 1
        try:
            pair_sample = is_pair(sample)
            if pair_sample:  # a preference pair: prompt + chosen, then prompt + rejected (train.stage=dpo)
                pair = parse_pair(sample)
                # a side that does not end (an IterDPO prefix) gets no <eos>
                docs = [encode_sample(tok, ParsedSample(pair.key, Document(pair.prompt.segments + side.segments),
                                                        [True] * len(pair.prompt.segments)
                                                        + [False] * len(side.segments)),
                                      dataclasses.replace(cfg, add_eos=cfg.add_eos and ends))
                        for side, ends in ((pair.chosen, pair.chosen_ends), (pair.rejected, pair.rejected_ends))]
                if np.array_equal(docs[0][0], docs[1][0]):
                    raise BadSample("bad_pair", "the chosen and the rejected response tokenize the same")
            else:
                docs = [encode_sample(tok, parse_sample(sample, cfg.pair_order, cfg.seed), cfg)]
        except BadSample as e:
            report.skip(e.reason, sample.get("__key__", "?"), str(e))
            continue
        except Exception as e:
            raise RuntimeError(f"preprocessing sample {sample.get('__key__', '?')!r} of {path} failed with "
                               f"{type(e).__name__}: {e}; a bug, not bad data (bad data is skipped and "
                               "counted), so the run stops here") from e
        n_pairs += pair_sample
        for ids, mask, boxes in docs:
            tokens_b.add_document(ids, [len(ids)])
            mask_b.add_document(mask, [len(mask)])
            per_modality += np.bincount(table[ids], minlength=len(MODALITY_NAMES))
            max_block = max(max_block, tok.vocab.longest_block(ids))
            if boxes:
                det_boxes[str(n_docs)] = boxes
            for routing in ("<det>", "<gen>"):
                routed[routing] += int((ids == tok.vocab.special(routing)).sum())
            n_docs += 1
    tokens_b.finalize(str(tmp[".idx"]))
    mask_b.finalize(str(tmp[".mask.idx"]))
    for suffix, p in tmp.items():
        os.replace(p, shard_dir / f"{name}{suffix}")
    if det_boxes:
        atomic_write_text(shard_dir / f"{name}.det.json", json.dumps({"documents": det_boxes}) + "\n")
    entry = {
        "name": name,
        "source": str(path),
        "samples": n_samples,
        "documents": n_docs,
        **({"pairs": n_pairs} if n_pairs else {}),
        "tokens": {"total": int(per_modality.sum()),
                   **{m: int(c) for m, c in zip(MODALITY_NAMES, per_modality) if m != "unused"}},
        "max_block": max_block,
        "skipped": dict(sorted(report.skipped.items())),
        "skipped_samples": report.samples,
        **({"routed": dict(routed)} if any(routed.values()) else {}),
    }
    atomic_write_text(shard_dir / f"{name}.json", json.dumps(entry, indent=1) + "\n")
    return entry


# --- worker processes ---------------------------------------------------------------------
_WORKER: dict = {}
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _one_thread_children():
    """Workers start with one OpenMP/BLAS thread each: N workers on N cores, no oversubscription
    (measured: two workers with default BLAS threads ran 0.7x of one worker on 2 cores)."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_worker(tokenizer_dir: str, cfg: dict, plugins: list[str]) -> None:
    import importlib

    import torch

    from omni.bundle import UnifiedTokenizer

    for module in plugins:  # tokenizer kinds the parent registered at run time
        importlib.import_module(module)
    torch.set_num_threads(1)  # parallelism comes from the processes
    _WORKER["tok"] = UnifiedTokenizer.load(tokenizer_dir)
    _WORKER["cfg"] = PreprocessConfig(**cfg)


def _work(job: tuple[str, str, str]) -> dict:
    path, name, out = job
    return process_shard(Path(path), name, Path(out), _WORKER["tok"], _WORKER["cfg"])


def preprocess(
    inputs: list[str],
    tokenizer_dir: str | os.PathLike,
    out: str | os.PathLike,
    cfg: PreprocessConfig | None = None,
    workers: int = 1,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict:
    """Tokenize this rank's shards (resuming), then write the manifest if every shard is done.

    Returns a summary: shards done by this call, skipped as already done, and whether the
    manifest was written.
    """
    from omni.bundle import UnifiedTokenizer

    cfg = cfg or PreprocessConfig()
    if world < 1 or not 0 <= rank < world:
        raise OmniError(f"--rank {rank} --world {world}: need world >= 1 and 0 <= rank < world")
    if workers < 1:
        raise OmniError(f"--workers must be >= 1, got {workers}")
    from omni.media import list_shards

    shards = list_shards(inputs)
    tok = UnifiedTokenizer.load(tokenizer_dir)  # validates the bundle before any work
    out = Path(out)
    names = [shard_name(i, p) for i, p in enumerate(shards)]
    mine = [(str(p), n, str(out)) for i, (p, n) in enumerate(zip(shards, names)) if i % world == rank]
    todo = [j for j in mine if not (out / "shards" / f"{j[1]}.json").is_file()]
    _check_same_run(out, tok, cfg, len(shards))

    from tqdm import tqdm

    t0 = time.time()
    done: list[dict] = []
    bar = tqdm(total=len(todo), unit="shard", desc=f"preprocess rank {rank}/{world}", disable=not progress)
    if workers == 1 or len(todo) <= 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # --workers N means N processes of one thread each
        try:
            for path, name, o in todo:
                done.append(process_shard(Path(path), name, Path(o), tok, cfg))
                bar.update(1)
                bar.set_postfix(docs=sum(d["documents"] for d in done))
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from omni.tokenizers.base import plugin_modules

        ctx = mp.get_context("spawn")  # fork after torch import can deadlock in OpenMP
        with _one_thread_children(), ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(str(tokenizer_dir), dataclasses.asdict(cfg), plugin_modules())) as pool:
            for entry in pool.map(_work, todo):
                done.append(entry)
                bar.update(1)
                bar.set_postfix(docs=sum(d["documents"] for d in done))
    bar.close()
    try:
        (out / ".tmp").rmdir()
    except OSError:
        pass  # absent, or another rank is still writing there
    wrote = write_manifest(out, tok, cfg, names)
    if wrote:
        check_skip_rate(out, cfg)
    if world > 1 and mine:
        # The run-level check above runs on the rank that happens to finish last; a rank whose own shards
        # gave nothing must say so itself, or its Slurm task exits 0 with "0 documents from 0 samples".
        check_rank(out, [n for _, n, _ in mine], rank, world, wrote)
    return {"shards_total": len(shards), "shards_mine": len(mine), "processed": len(done),
            "already_done": len(mine) - len(todo), "manifest": wrote, "seconds": time.time() - t0,
            "samples": sum(d["samples"] for d in done), "documents": sum(d["documents"] for d in done),
            **skip_summary(done)}


def finalize(inputs: list[str], tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
             cfg: PreprocessConfig | None = None) -> dict:
    """Check that every shard of a (multi-rank) run is done and write its manifest: the job that follows
    a Slurm preprocess array (`omni launch slurm --preprocess`). Tokenizes nothing; the manifest equals
    the one the last rank to finish wrote (it is written the same way). Returns the manifest's totals."""
    from omni.bundle import UnifiedTokenizer
    from omni.media import list_shards

    cfg = cfg or PreprocessConfig()
    out = Path(out)
    shards = list_shards(inputs)
    if not (out / "preprocess.json").is_file():
        raise OmniError(f"{out} holds no preprocess run (no preprocess.json): run `omni data preprocess` on these "
                        "inputs first")
    tok = UnifiedTokenizer.load(tokenizer_dir)
    _check_same_run(out, tok, cfg, len(shards))
    names = [shard_name(i, p) for i, p in enumerate(shards)]
    missing = [(i, n) for i, n in enumerate(names) if not (out / "shards" / f"{n}.json").is_file()]
    if missing:
        first = ", ".join(f"{n} (input shard {i})" for i, n in missing[:5])
        raise OmniError(f"{len(missing)} of {len(names)} shard(s) are not done, first: {first}; rerun the preprocess "
                        "task(s) they belong to (shard i belongs to rank i % world; a rerun skips finished shards), "
                        "then finalize again")
    wrote = write_manifest(out, tok, cfg, names)
    assert wrote, "every shard is done: checked above"
    check_skip_rate(out, cfg)
    return json.loads((out / MANIFEST).read_text())["totals"]


def _check_same_run(out: Path, tok, cfg: PreprocessConfig, n_shards: int) -> None:
    """A folder being resumed must have been started with the same tokenizer and options."""
    marker = out / "preprocess.json"
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "max_skip_fraction"}  # not in the output
    want = {"format": FORMAT_VERSION, "tokenizer": tok.identity(), "config": config, "n_shards": n_shards}
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have != want:
            diff = [k for k in want if have.get(k) != want[k]]
            raise OmniError(f"{out} holds a preprocess run with other {', '.join(diff)}; "
                            f"use a new --out folder or delete {out}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(want, indent=1) + "\n")


EXAMPLE_KEYS = 3
"""Sample keys named per skip reason on the console and in error messages."""


def skip_summary(entries: list[dict], n_keys: int = EXAMPLE_KEYS) -> dict:
    """Skips of some shards' entries: ``skipped`` (reason -> count), ``skip_examples`` (reason -> the
    first ``n_keys`` sample keys, in shard order; a ``corrupt_shard`` key is the shard's file name) and
    ``skip_details`` (reason -> what was wrong with the first of them)."""
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    details: dict[str, str] = {}
    for e in entries:
        skipped.update(e["skipped"])
        for key, reason, *detail in e.get("skipped_samples", []):
            keys = examples.setdefault(reason, [])
            if len(keys) < n_keys:
                keys.append(key)
            details.setdefault(reason, detail[0] if detail else "")
    return {"skipped": dict(sorted(skipped.items())),
            "skip_examples": {r: examples.get(r, []) for r in sorted(skipped)},
            "skip_details": {r: details[r] for r in sorted(skipped) if details.get(r)}}


def _keys(summary: dict, reason: str) -> str:
    keys = summary["skip_examples"].get(reason, [])
    more = ", ..." if summary["skipped"][reason] > len(keys) else ""
    return f" ({', '.join(keys)}{more})" if keys else ""


def skip_lines(summary: dict) -> list[str]:
    """One console line per skip reason: its count and the first sample keys."""
    return [f"  {reason}: {n}{_keys(summary, reason)}" for reason, n in summary["skipped"].items()]


def _reasons(summary: dict, detail_chars: int = 120) -> str:
    """The skip reasons on one line (error messages), each with its first keys and what was wrong with
    the first: ``2 corrupt_image (a, b; first: cannot identify image file), 1 bad_json (c; first: ...)``."""
    parts = []
    for r, n in summary["skipped"].items():
        keys, detail = _keys(summary, r), summary.get("skip_details", {}).get(r, "")[:detail_chars]
        if detail:
            keys = f"{keys[:-1]}; first: {detail})" if keys else f" (first: {detail})"
        parts.append(f"{n} {r}{keys}")
    return ", ".join(parts) or "no sample read"


def _entries(out: Path, names: list[str]) -> list[dict]:
    return [json.loads((out / "shards" / f"{n}.json").read_text()) for n in names]


def check_skip_rate(out: Path, cfg: PreprocessConfig) -> None:
    """Fail (OmniError, exit 2) when the finished run skipped more than ``cfg.max_skip_fraction`` of
    the samples it read, or wrote no document; the manifest is already written, and named."""
    manifest = json.loads((out / MANIFEST).read_text())
    totals = manifest["totals"]
    samples, docs = totals["samples"], totals["documents"]
    share = (samples - docs + totals.get("pairs", 0)) / samples if samples else 1.0  # a pair: 1 sample, 2 documents
    # a shard that breaks (unreadable from its start: no sample counted at all) is measured by shards
    broken = sum(1 for e in manifest["shards"] if e["skipped"].get("corrupt_shard"))
    shard_share = broken / max(1, len(manifest["shards"]))
    if docs and share <= cfg.max_skip_fraction and shard_share <= cfg.max_skip_fraction:
        return
    reasons = _reasons(skip_summary(_entries(out, [e["name"] for e in manifest["shards"]])))
    n_shards = len(manifest["shards"])
    if not docs:  # no limit accepts an empty dataset: the input itself is wrong
        raise OmniError(f"{out}: the run wrote no document: {samples} samples read from {n_shards} shard(s); "
                        f"skipped: {reasons}. Nothing to train on: check the --input shards (their format is "
                        f"in docs/data.md); {out / MANIFEST} and each shard's NAME.json list the skipped samples")
    what = (f"skipped {share:.1%} of {samples} samples" if share > cfg.max_skip_fraction else
            f"lost {broken} of {n_shards} shards to corruption ({shard_share:.1%})")
    raise OmniError(f"{out}: the run {what}, above data.preprocess.max_skip_fraction={cfg.max_skip_fraction}: "
                    f"{reasons}; the manifest and each shard's NAME.json list the skipped samples (raise "
                    "max_skip_fraction to accept the rest)")


def check_rank(out: Path, names: list[str], rank: int, world: int, manifest_written: bool) -> None:
    """Fail (OmniError, exit 2) when this rank's shards, all done, wrote no document: the run-level
    check runs only where the manifest is written, and an unreadable shard adds no sample to its
    skipped share, so a lost shard would otherwise pass unseen."""
    entries = _entries(out, names)
    if any(e["documents"] for e in entries):
        return
    samples = sum(e["samples"] for e in entries)
    later = ("" if manifest_written else
             "; the other ranks' shards are not all done, so manifest.json is not written yet")
    raise OmniError(f"rank {rank}/{world}: this rank's {len(entries)} shard(s) wrote no document ({samples} "
                    f"samples read); skipped: {_reasons(skip_summary(entries))}{later}. Repair or replace those "
                    f"shards (their format is in docs/data.md), delete their NAME.json in {out / 'shards'} and "
                    "rerun this rank")


def write_manifest(out: Path, tok, cfg: PreprocessConfig, names: list[str]) -> bool:
    """Write ``manifest.json`` if every shard is done; returns whether it was written."""
    entries = []
    for n in names:
        p = out / "shards" / f"{n}.json"
        if not p.is_file():
            return False
        entries.append(json.loads(p.read_text()))
    remove_stale_temps(out / "shards")  # every shard is done: a temp file left by a killed run is garbage
    totals: dict = {"samples": 0, "documents": 0, "tokens": Counter(), "skipped": Counter(), "max_block": 0}
    routed = Counter()
    for e in entries:
        routed.update(e.get("routed", {}))
        totals["samples"] += e["samples"]
        totals["documents"] += e["documents"]
        if e.get("pairs"):
            totals["pairs"] = totals.get("pairs", 0) + e["pairs"]
        totals["tokens"].update(e["tokens"])
        totals["skipped"].update(e["skipped"])
        totals["max_block"] = max(totals["max_block"], e["max_block"])
    totals["tokens"] = dict(totals["tokens"])
    totals["skipped"] = dict(sorted(totals["skipped"].items()))
    if routed:
        totals["routed"] = dict(sorted(routed.items()))
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer": tok.identity(),
        "config": dataclasses.asdict(cfg),
        "totals": totals,
        "shards": [{k: v for k, v in e.items() if k != "skipped_samples"} for e in entries],
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return True
