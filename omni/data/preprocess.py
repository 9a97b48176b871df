"""`omni data preprocess`: raw WebDataset shards -> Megatron indexed token datasets + a manifest.

Output folder::

    DIR/shards/NAME.bin, NAME.idx            token ids (int32), one sequence per document
    DIR/shards/NAME.mask.bin, NAME.mask.idx  per-token loss mask (uint8; 0 on prompt segments)
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
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")


def list_shards(inputs: list[str]) -> list[Path]:
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
    # one entry per file, in a fixed order
    return sorted(set(shards), key=lambda p: str(p))


def shard_name(index: int, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name.split(".")[0])
    return f"{index:05d}-{stem}"


def _samples(path: Path, errors: list[str]):
    """Grouped samples of one shard; a broken tar stream ends it and is recorded in ``errors``."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def on_error(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn}")
        return False  # stop reading this shard: the stream is broken

    with open(path, "rb") as f:
        try:
            files = ({**m, "__url__": str(path)} for m in tar_file_iterator(f, handler=on_error))
            yield from group_by_keys(files, handler=on_error)
        except Exception as e:  # tarfile errors raised while opening or between members
            errors.append(f"{type(e).__name__}: {e}")


def encode_sample(tok, parsed, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """A parsed sample -> (ids int32 [T], loss mask uint8 [T]); prompt segments get mask 0."""
    from omni.data.samples import BadSample
    from omni.vocab import Document

    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    v = tok.vocab
    if cfg.add_bos:
        ids.append(np.array([v.special("<bos>")], np.int32))
        mask.append(np.zeros(1, np.uint8))  # never a target
    for seg, prompt in zip(parsed.doc.segments, parsed.prompt):
        try:
            seg_ids = tok.encode(Document([seg]), bos=False).numpy().astype(np.int32)
        except Exception as e:  # any tokenizer failure skips the sample, never the run
            raise BadSample("tokenize_error", f"{type(e).__name__}: {e}") from None
        ids.append(seg_ids)
        mask.append(np.full(len(seg_ids), 0 if prompt else 1, np.uint8))
    if cfg.add_eos:
        ids.append(np.array([v.special("<eos>")], np.int32))
        mask.append(np.ones(1, np.uint8))
    return np.concatenate(ids), np.concatenate(mask)


def longest_block(ids: np.ndarray, opens: np.ndarray, closes: np.ndarray) -> int:
    """Length of the longest image/audio block (markers included) in ``ids``."""
    starts = np.flatnonzero(np.isin(ids, opens))
    ends = np.flatnonzero(np.isin(ids, closes))
    best = 0
    for s in starts:
        after = ends[ends > s]
        if len(after):
            best = max(best, int(after[0] - s + 1))
    return best


def process_shard(path: Path, name: str, out: Path, tok, cfg: PreprocessConfig) -> dict:
    """Tokenize one shard into ``out/shards/NAME.*``; returns (and writes) its manifest entry."""
    from omni.data import indexed_dataset
    from omni.data.samples import BadSample, parse_sample
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
    sp = tok.vocab.specials
    opens, closes = np.array([sp["<boi>"], sp["<boa>"]]), np.array([sp["<eoi>"], sp["<eoa>"]])

    skipped: Counter[str] = Counter()
    skipped_list: list[list[str]] = []
    per_modality = np.zeros(len(MODALITY_NAMES), np.int64)
    n_samples = n_docs = max_block = 0
    stream_errors: list[str] = []
    for sample in _samples(path, stream_errors):
        n_samples += 1
        try:
            parsed = parse_sample(sample, cfg.pair_order, cfg.seed)
            ids, mask = encode_sample(tok, parsed, cfg)
        except BadSample as e:
            skipped[e.reason] += 1
            if len(skipped_list) < cfg.log_skipped:
                skipped_list.append([sample.get("__key__", "?"), e.reason, str(e)])
            continue
        tokens_b.add_document(ids, [len(ids)])
        mask_b.add_document(mask, [len(mask)])
        per_modality += np.bincount(table[ids], minlength=len(MODALITY_NAMES))
        max_block = max(max_block, longest_block(ids, opens, closes))
        n_docs += 1
    if stream_errors:
        skipped["corrupt_shard"] += 1
        skipped_list.append([path.name, "corrupt_shard", stream_errors[0]])
    tokens_b.finalize(str(tmp[".idx"]))
    mask_b.finalize(str(tmp[".mask.idx"]))
    for suffix, p in tmp.items():
        os.replace(p, shard_dir / f"{name}{suffix}")
    entry = {
        "name": name,
        "source": str(path),
        "samples": n_samples,
        "documents": n_docs,
        "tokens": {"total": int(per_modality.sum()),
                   **{m: int(c) for m, c in zip(MODALITY_NAMES, per_modality) if m != "unused"}},
        "max_block": max_block,
        "skipped": dict(sorted(skipped.items())),
        "skipped_samples": skipped_list,
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

    from omni.vocab import UnifiedTokenizer

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
    from omni.vocab import UnifiedTokenizer

    cfg = cfg or PreprocessConfig()
    if world < 1 or not 0 <= rank < world:
        raise OmniError(f"--rank {rank} --world {world}: need world >= 1 and 0 <= rank < world")
    if workers < 1:
        raise OmniError(f"--workers must be >= 1, got {workers}")
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
    return {"shards_total": len(shards), "shards_mine": len(mine), "processed": len(done),
            "already_done": len(mine) - len(todo), "manifest": wrote, "seconds": time.time() - t0,
            "samples": sum(d["samples"] for d in done), "documents": sum(d["documents"] for d in done)}


def _check_same_run(out: Path, tok, cfg: PreprocessConfig, n_shards: int) -> None:
    """A folder being resumed must have been started with the same tokenizer and options."""
    marker = out / "preprocess.json"
    want = {"format": FORMAT_VERSION, "tokenizer": tok.identity(), "config": dataclasses.asdict(cfg),
            "n_shards": n_shards}
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have != want:
            diff = [k for k in want if have.get(k) != want[k]]
            raise OmniError(f"{out} holds a preprocess run with other {', '.join(diff)}; "
                            f"use a new --out folder or delete {out}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(want, indent=1) + "\n")


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
    for e in entries:
        totals["samples"] += e["samples"]
        totals["documents"] += e["documents"]
        totals["tokens"].update(e["tokens"])
        totals["skipped"].update(e["skipped"])
        totals["max_block"] = max(totals["max_block"], e["max_block"])
    totals["tokens"] = dict(totals["tokens"])
    totals["skipped"] = dict(sorted(totals["skipped"].items()))
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer": tok.identity(),
        "config": dataclasses.asdict(cfg),
        "totals": totals,
        "shards": [{k: v for k, v in e.items() if k != "skipped_samples"} for e in entries],
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return True
