"""Training of the whisper-VQ audio tokenizer (:mod:`omni.tokenizers.audio`).

Data: audio folders (searched recursively) and WebDataset ``.tar`` shards (their ``.wav``,
``.flac`` and ``.ogg`` members; other members belong to other modalities and are ignored). Files
are read with soundfile (no ffmpeg), averaged to mono and resampled to 16 kHz. Empty,
silent-only, corrupt and unsupported (.mp3, .m4a, ...) files are skipped and counted, never fatal.

Training is a VQ-VAE on whisper log-mel: windows of exactly ``chunk_seconds`` (the encoder's
window, see the module docstring of :mod:`omni.tokenizers.audio`) are cut at random, token-aligned,
from the clips; loss = L1(decoded log-mel, log-mel) + commitment loss; AdamW with warmup and
cosine decay. Its evaluation (mel L1, codebook usage, envelope correlation, real-time factors)
is :func:`omni.eval.tokenizers.evaluate_audio_tokenizer`.

SIGTERM / SIGUSR1 / SIGINT (a Slurm time limit or preemption, Ctrl-C) finish the current step,
save its checkpoint and stop without the final files (exit 0, 130 for Ctrl-C); rerunning resumes.

Data parallel under torchrun (``python -m omni.parallel.launch --standalone --nproc-per-node N -m
omni tokenizer train audio ...``; gloo: the trainer runs on CPUs): ``train.batch_size`` stays the
global batch (it must divide by N). Every rank reads every clip, draws the same windows of each
step from the same generator and computes its own contiguous rows; gradients are averaged with one
all-reduce (:func:`omni.run.average_gradients`, as the image trainer does). Rank 0 writes
(run.yaml, metrics, checkpoints, the tokenizer, train_summary.json); every rank resumes from the
same checkpoint. The batch statistics are the global batch's, as in one process: the codebook's EMA
counts and sums (vector-quantize-pytorch's ``sync_codebook``), the k-means init on the first batch
(every rank runs it alike on the whole batch before the step's synced forward), the logged losses
and codebook usage. Two processes therefore train the weights of one process to float rounding,
except for dead-code restarts: they sample new codes from every rank's own vectors (the library's
distributed sampling), so which vectors replace dead codes differs from one process; it is the same
on every rank, and the ranks' identical weights are checked at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omni import run
from omni.config.audio_tokenizer import AudioTokenizerRecipe
from omni.errors import OmniError
from omni.media import AUDIO_EXTS, BadSample, SkipReport, expand_sources, iter_media, read_audio
from omni.tokenizers.audio import SAMPLE_RATE, WhisperVQAudioTokenizer
from omni.tokenizers.image_train import (
    codebooks_pending_init,
    local_codebooks,
    rank_rng_state,
    set_rank_rng_state,
    sync_codebooks,
)

SUMMARY_FILE = "train_summary.json"
"""Written last by a finished run: steps, seconds, data and the last training figures."""
SILENCE = 1e-4
"""Clips whose peak stays below this are silent-only and skipped (``corrupt_audio``)."""


# ---------------------------------------------------------------------------------------------
# Reading audio (omni.media: one reader, one skip report)
# ---------------------------------------------------------------------------------------------
@dataclass
class Clip:
    name: str
    wave: np.ndarray
    """float32 [T] at 16 kHz, mono."""

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLE_RATE


def iter_clips(data, report: SkipReport, limit: int | None = None) -> Iterator[Clip]:
    """Clips from folders, audio files and WebDataset .tar shards, in a fixed (sorted) order:
    averaged to mono and resampled to 16 kHz; unreadable, empty and silent clips go to ``report``."""
    from omni.tokenizers.audio import to_mono_16k

    n = 0
    for name, data_bytes in iter_media(expand_sources(data, "audio"), "audio", report):
        if limit is not None and n >= limit:
            return
        try:
            wave, sr = read_audio(data_bytes, silence=SILENCE)  # [C, T]
        except BadSample as e:
            report.skip(e.reason, name, e.detail)
            continue
        report.read += 1
        n += 1
        yield Clip(name, to_mono_16k(torch.from_numpy(wave), sr).numpy())


def load_clips(data, limit: int | None = None) -> tuple[list[Clip], SkipReport]:
    report = SkipReport()
    clips = list(iter_clips(data, report, limit))
    if not clips:
        raise OmniError(f"no usable audio in {data}: {report} (supported: {', '.join(AUDIO_EXTS)} "
                        "files in folders or WebDataset .tar shards)")
    return clips, report


def describe(clips: list[Clip], report: SkipReport) -> str:
    """One line: clips kept, seconds of audio, what was skipped."""
    return f"{len(clips)} clips, {sum(c.seconds for c in clips):.1f} s of audio; {report}"


def data_json(clips: list[Clip], report: SkipReport) -> dict:
    return {"clips": len(clips), "seconds": round(sum(c.seconds for c in clips), 3),
            "skipped": dict(sorted(report.skipped.items()))}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
class _Windows:
    """Token-aligned log-mel windows of one encoder chunk, cut at random from in-memory clips."""

    def __init__(self, tok: WhisperVQAudioTokenizer, clips: list[Clip], seed: int):
        cfg = tok.config
        self.length = 2 * cfg.n_ctx  # mel frames per window
        self.align = cfg.frames_per_token
        # Each clip's log-mel, computed once per clip (whisper's floor is per clip), padded to whole chunks.
        self.mels = [tok.mel_chunks(torch.from_numpy(c.wave))[0].permute(1, 0, 2).reshape(cfg.n_mels, -1)
                     for c in clips]
        # Sample clips in proportion to their length (a clip of 3 chunks is picked 3x as often).
        self.weights = torch.tensor([m.shape[1] / self.length for m in self.mels], dtype=torch.float)
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int, rows: slice = slice(None)) -> torch.Tensor:
        """Rows ``rows`` of a batch of ``size`` windows: [rows, n_mels, length] (all ``size`` by default).
        The generator draws all ``size`` windows whatever ``rows``: every data-parallel rank draws the
        same global batch and takes its own rows."""
        idx = torch.multinomial(self.weights, size, replacement=True, generator=self.gen)
        out = []
        for i in idx.tolist():
            m = self.mels[i]
            starts = (m.shape[1] - self.length) // self.align + 1
            s = int(torch.randint(starts, (1,), generator=self.gen)) * self.align
            out.append(m[:, s : s + self.length])
        return torch.stack(out[rows])


def _lr(step: int, cfg) -> float:
    """The run convention's schedule: warmup, then cosine decay to lr/10."""
    return run.lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, "cosine", 0.1 * cfg.lr)


def train_audio_tokenizer(data, recipe: AudioTokenizerRecipe | None = None, out: str | os.PathLike | None = None,
                          progress: bool = True, resume: bool = True) -> tuple[WhisperVQAudioTokenizer, dict]:
    """Train on ``data`` (folders / files / shards); returns (tokenizer, summary).

    With ``out``, the run follows the convention of :mod:`omni.run`: ``run.yaml``, ``metrics.jsonl``,
    a checkpoint ``step_XXXXXX/`` every ``save_every`` steps (weights, optimizer, the window
    sampler's and the global RNG states), from which a killed run resumes (``resume``) to the same
    weights as an uninterrupted one; and once finished the tokenizer itself and ``train_summary.json``.
    A run in ``out`` that is finished already (:func:`finished_step`) is left as it is: it says so and
    returns the tokenizer of ``out`` and its saved summary (with ``finished_already: True``) without
    reading data; ``resume=False`` trains it again from scratch, a larger ``train.steps`` continues it.
    With ``out``, SIGTERM / SIGUSR1 / SIGINT finish the step, save a checkpoint and raise
    :class:`omni.run.TrainingStopped`.

    Under a torch.distributed process group (torchrun; the command line starts it), call it on every
    rank: data parallel over the ranks, see the module docstring.
    """
    recipe = recipe or AudioTokenizerRecipe()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.train.num_threads)
    try:
        return _train(data, recipe, None if out is None else Path(out), progress, resume)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _save(out: Path, tok: WhisperVQAudioTokenizer, recipe: AudioTokenizerRecipe, step: int, opt, windows) -> Path:
    """Rank 0 writes ``OUT/step_XXXXXX``; every rank calls it (it gathers the ranks' RNG states)."""
    from omni.tokenizers.base import save_tokenizer

    extra = rank_rng_state()
    if run.dp_rank_world()[0] == 0:
        run.write_checkpoint(out, step, lambda d: save_tokenizer(tok, d), optimizers={"opt": opt.state_dict()},
                             trainer_state={"windows_rng": windows.gen.get_state().tolist(), **extra}, config=recipe)
        run.prune(out, 1)  # the newest intact checkpoint is all a resume needs
    run.barrier()
    return run.step_dir(out, step)


def finished_step(out: Path, ckpt: Path, steps: int) -> int | None:
    """The step at which the run in ``out`` finished, or None if it has more to do.

    Finished: its newest intact checkpoint ``ckpt`` reached ``steps``, ``out`` itself holds the
    tokenizer of that checkpoint (the same fingerprint: a run killed between its last checkpoint and
    the final files, or one continued to more steps, is not finished) and ``train_summary.json`` of
    that step."""
    from omni.tokenizers.base import TOKENIZER_FILE

    try:
        step = int(json.loads((ckpt / run.TRAINER_STATE).read_text())["step"])
        same = (json.loads((out / TOKENIZER_FILE).read_text())["fingerprint"]
                == json.loads((ckpt / TOKENIZER_FILE).read_text())["fingerprint"])
        summarized = json.loads((out / SUMMARY_FILE).read_text()).get("steps") == step
    except (OSError, ValueError, KeyError):  # a final file missing or cut short: not finished
        return None
    return step if step >= steps and same and summarized else None


def _last_logged(out: Path) -> dict:
    """The last training row of ``out/metrics.jsonl`` (a run resumed at its end trains no step)."""
    rows = [json.loads(ln) for ln in (out / run.METRICS).read_text().splitlines() if ln.strip()]
    return next((r for r in reversed(rows) if "mel_l1" in r), {})


def _train(data, recipe: AudioTokenizerRecipe, out: Path | None, progress: bool,
           resume: bool) -> tuple[WhisperVQAudioTokenizer, dict]:
    from omni.io import atomic_write_text
    from omni.tokenizers.base import save_tokenizer

    tcfg = recipe.train
    rank, world = run.dp_rank_world()
    b = run.check_global_batch(tcfg.batch_size, world, "train.batch_size")
    rows = slice(rank * b, (rank + 1) * b)  # this rank's rows of every global batch
    main = rank == 0
    say = print if main else (lambda *a, **k: None)  # rank 0 speaks and writes; the others train alongside
    progress = progress and main
    found = run.find_resume(out, "auto" if resume else "none") if out is not None else None
    if found is not None:
        from omni.config import load_config, to_dict

        saved = load_config(AudioTokenizerRecipe, found / run.RUN_CONFIG)
        if to_dict(saved.tokenizer) != to_dict(recipe.tokenizer):
            raise OmniError(f"{out} holds a run of another tokenizer config; resume it with the same config, "
                            f"or pass another --out (or --no-resume to start over there)")
        done_at = finished_step(out, found, tcfg.steps)
        if done_at is not None:  # the decoder trainer's convention: a finished run is not redone
            say(f"{out} is finished already (step {done_at} of train.steps={tcfg.steps}, summary in "
                f"{out / SUMMARY_FILE}): nothing to do; --no-resume trains it again from scratch, a larger "
                "train.steps= continues it")
            summary = json.loads((out / SUMMARY_FILE).read_text())
            return WhisperVQAudioTokenizer.load(out), {**summary, "finished_already": True}
    torch.manual_seed(tcfg.seed)
    clips, stats = load_clips(data, tcfg.max_clips)  # every rank reads every clip
    if progress:
        print(f"audio data: {describe(clips, stats)}")
    if found is not None:
        tok = WhisperVQAudioTokenizer.load(found)
    else:
        tok = WhisperVQAudioTokenizer.from_config(recipe.tokenizer)  # the same initial weights on every rank
    model = tok.model.train()
    if tok.config.freeze_encoder:
        model.encoder.requires_grad_(False)
    if world > 1:
        sync_codebooks(model, True)
    windows = _Windows(tok, clips, tcfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.99))
    start = 0
    if found is not None:
        state, optimizers, rng = run.read_checkpoint(found)
        opt.load_state_dict(optimizers["opt"])
        windows.gen.set_state(torch.tensor(state["windows_rng"], dtype=torch.uint8))
        run.set_rng_state(state["rng"], rng)  # the quantizer's k-means and code restarts draw from torch's RNG
        set_rank_rng_state(state)
        start = int(state["step"])
        say(f"resuming {out} at step {start}")
    run.barrier()  # every rank has read OUT before rank 0 writes there
    if out is not None and main:
        if found is None and run.discard_checkpoints(out):
            print(f"starting over in {out}: its earlier checkpoints were discarded")
        run.save_run_config(recipe, out)
    metrics = (run.MetricsLog(out, resume_step=start, tensorboard=tcfg.tensorboard, enabled=main)
               if out is not None else None)
    # Data parallel: the k-means init of the first batch runs alike on every rank on the whole global
    # batch (as one process runs it), before the step's synced forward (see the module docstring).
    init_on_whole_batch = world > 1 and codebooks_pending_init(model)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, initial=start, desc="audio tokenizer", unit="step")
    t0 = time.perf_counter()
    step = start - 1
    last: dict = {}
    stopped = 0
    with run.StopFlag(announce=main) if out is not None else contextlib.nullcontext() as stop:
        for step in range(start, tcfg.steps):
            for g in opt.param_groups:
                g["lr"] = _lr(step, tcfg)
            if init_on_whole_batch:
                mel_all = windows.batch(tcfg.batch_size)  # [B, n_mels, 2*n_ctx]
                with torch.no_grad(), local_codebooks(model, init_only=True):
                    model.quantize(model.latents(mel_all))
                init_on_whole_batch = False
                mel = mel_all[rows]
            else:
                mel = windows.batch(tcfg.batch_size, rows)  # [b, n_mels, 2*n_ctx]
            recon, codes, commit = model(mel)
            l1 = F.l1_loss(recon, mel)
            loss = l1 + commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            run.average_gradients(params)  # the global batch's gradient (identity in one process)
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            elapsed = time.perf_counter() - t0
            loss_v, l1_v, commit_v, usage = _step_figures(loss, l1, commit, codes, tok.codebook_size, world)
            last = {"step": step + 1, "loss": loss_v, "mel_l1": l1_v, "commit": commit_v, "batch_usage": usage,
                    "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 2)}
            # every rank stops after the same step: on the first signal, or rank 0's clock reaching time_limit_s
            flags = torch.tensor([float(getattr(stop, "signal", None) or 0),
                                  float(bool(main and tcfg.time_limit_s and elapsed >= tcfg.time_limit_s))])
            stopped, time_up = (int(v) for v in run.all_reduce(flags, "max").tolist())
            if metrics is not None and ((step + 1) % tcfg.log_every == 0 or step == 0 or step + 1 == tcfg.steps
                                        or time_up):
                metrics.write(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(l1=f"{last['mel_l1']:.3f}", usage=f"{last['batch_usage']:.2f}")
            if out is not None and tcfg.save_every and (step + 1) % tcfg.save_every == 0 and step + 1 != tcfg.steps:
                _save(out, tok, recipe, step + 1, opt, windows)
            if time_up or stopped:
                break
    if bar is not None:
        bar.close()
    model.eval()
    run.check_replicas(model, "audio tokenizer")
    if stopped:
        saved = tcfg.save_every and (step + 1) % tcfg.save_every == 0 and step + 1 != tcfg.steps
        ckpt = run.step_dir(out, step + 1) if saved else _save(out, tok, recipe, step + 1, opt, windows)
        metrics.close()
        say(f"{signal.Signals(stopped).name}: saved {ckpt}; rerun the same command to resume", flush=True)
        raise run.TrainingStopped(stopped, ckpt)
    if not last and out is not None:  # resumed at its last step: the figures are those it logged then
        last = _last_logged(out)
    summary = {"steps": step + 1, "train_seconds": round(time.perf_counter() - t0, 1),
               "data": data_json(clips, stats), "final": last}
    if out is not None:
        if step + 1 > start:  # else the newest checkpoint is this state already
            _save(out, tok, recipe, step + 1, opt, windows)
        metrics.close()
        if main:
            save_tokenizer(tok, out)  # OUT itself is the finished tokenizer folder
            atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")  # last: the run is finished
        run.barrier()  # the other ranks return once the run is finished on disk
    return tok, summary


def _step_figures(loss: torch.Tensor, l1: torch.Tensor, commit: torch.Tensor, codes: torch.Tensor, n_codes: int,
                  world: int) -> tuple[float, float, float, float]:
    """(loss, mel L1, commitment loss, share of the codebook used) of the global batch.

    One process: this batch's. Data parallel: the losses are means of equal shares, so their global
    mean is the mean over the ranks (one all-reduce, with the codes each rank used)."""
    if world == 1:
        return loss.item(), l1.item(), commit.item(), codes.unique().numel() / n_codes
    sums = torch.zeros(3 + n_codes, dtype=torch.float64)  # [loss, l1, commit, then per code: ranks using it]
    sums[:3] = torch.tensor([loss.item(), l1.item(), commit.item()], dtype=torch.float64)
    sums[3 + codes.flatten()] = 1
    run.all_reduce(sums)
    loss_v, l1_v, commit_v = (sums[:3] / world).tolist()
    return loss_v, l1_v, commit_v, int((sums[3:] > 0).sum()) / n_codes


__all__ = [
    "Clip",
    "describe",
    "iter_clips",
    "load_clips",
    "train_audio_tokenizer",
]
