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
"""

from __future__ import annotations

import json
import os
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

    def batch(self, size: int) -> torch.Tensor:
        """[size, n_mels, length]."""
        idx = torch.multinomial(self.weights, size, replacement=True, generator=self.gen)
        out = []
        for i in idx.tolist():
            m = self.mels[i]
            starts = (m.shape[1] - self.length) // self.align + 1
            s = int(torch.randint(starts, (1,), generator=self.gen)) * self.align
            out.append(m[:, s : s + self.length])
        return torch.stack(out)


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
    """
    recipe = recipe or AudioTokenizerRecipe()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.train.num_threads)
    try:
        return _train(data, recipe, None if out is None else Path(out), progress, resume)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _save(out: Path, tok: WhisperVQAudioTokenizer, recipe: AudioTokenizerRecipe, step: int, opt, windows) -> None:
    from omni.tokenizers.base import save_tokenizer

    run.write_checkpoint(out, step, lambda d: save_tokenizer(tok, d), optimizers={"opt": opt.state_dict()},
                     trainer_state={"windows_rng": windows.gen.get_state().tolist()}, config=recipe)
    run.prune(out, 1)  # the newest intact checkpoint is all a resume needs


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
    found = run.find_resume(out, "auto" if resume else "none") if out is not None else None
    if found is not None:
        from omni.config import load_config, to_dict

        saved = load_config(AudioTokenizerRecipe, found / run.RUN_CONFIG)
        if to_dict(saved.tokenizer) != to_dict(recipe.tokenizer):
            raise OmniError(f"{out} holds a run of another tokenizer config; resume it with the same config, "
                            f"or pass another --out (or --no-resume to start over there)")
        done_at = finished_step(out, found, tcfg.steps)
        if done_at is not None:  # the decoder trainer's convention: a finished run is not redone
            print(f"{out} is finished already (step {done_at} of train.steps={tcfg.steps}, summary in "
                  f"{out / SUMMARY_FILE}): nothing to do; --no-resume trains it again from scratch, a larger "
                  "train.steps= continues it")
            summary = json.loads((out / SUMMARY_FILE).read_text())
            return WhisperVQAudioTokenizer.load(out), {**summary, "finished_already": True}
    torch.manual_seed(tcfg.seed)
    clips, stats = load_clips(data, tcfg.max_clips)
    if progress:
        print(f"audio data: {describe(clips, stats)}")
    if found is not None:
        tok = WhisperVQAudioTokenizer.load(found)
    else:
        if out is not None and run.discard_checkpoints(out):
            print(f"starting over in {out}: its earlier checkpoints were discarded")
        tok = WhisperVQAudioTokenizer.from_config(recipe.tokenizer)
    model = tok.model.train()
    if tok.config.freeze_encoder:
        model.encoder.requires_grad_(False)
    windows = _Windows(tok, clips, tcfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.99))
    start = 0
    if found is not None:
        state, optimizers, rng = run.read_checkpoint(found)
        opt.load_state_dict(optimizers["opt"])
        windows.gen.set_state(torch.tensor(state["windows_rng"], dtype=torch.uint8))
        run.set_rng_state(state["rng"], rng)  # the quantizer's k-means and code restarts draw from torch's RNG
        start = int(state["step"])
        print(f"resuming {out} at step {start}")
    if out is not None:
        run.save_run_config(recipe, out)
    metrics = run.MetricsLog(out, resume_step=start, tensorboard=tcfg.tensorboard) if out is not None else None

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, initial=start, desc="audio tokenizer", unit="step")
    t0 = time.perf_counter()
    step = start - 1
    last: dict = {}
    for step in range(start, tcfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, tcfg)
        mel = windows.batch(tcfg.batch_size)  # [B, n_mels, 2*n_ctx]
        recon, codes, commit = model(mel)
        l1 = F.l1_loss(recon, mel)
        loss = l1 + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        elapsed = time.perf_counter() - t0
        last = {"step": step + 1, "loss": loss.item(), "mel_l1": l1.item(), "commit": commit.item(),
                "batch_usage": codes.unique().numel() / tok.codebook_size, "lr": opt.param_groups[0]["lr"],
                "elapsed_s": round(elapsed, 2)}
        stop = tcfg.time_limit_s and elapsed >= tcfg.time_limit_s
        if metrics is not None and ((step + 1) % tcfg.log_every == 0 or step == 0 or step + 1 == tcfg.steps or stop):
            metrics.write(last)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(l1=f"{last['mel_l1']:.3f}", usage=f"{last['batch_usage']:.2f}")
        if out is not None and tcfg.save_every and (step + 1) % tcfg.save_every == 0 and step + 1 != tcfg.steps:
            _save(out, tok, recipe, step + 1, opt, windows)
        if stop:
            break
    if bar is not None:
        bar.close()
    model.eval()
    if not last and out is not None:  # resumed at its last step: the figures are those it logged then
        last = _last_logged(out)
    summary = {"steps": step + 1, "train_seconds": round(time.perf_counter() - t0, 1),
               "data": data_json(clips, stats), "final": last}
    if out is not None:
        if step + 1 > start:  # else the newest checkpoint is this state already
            _save(out, tok, recipe, step + 1, opt, windows)
        metrics.close()
        save_tokenizer(tok, out)  # OUT itself is the finished tokenizer folder
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")  # last: the run is finished
    return tok, summary


__all__ = [
    "Clip",
    "describe",
    "iter_clips",
    "load_clips",
    "train_audio_tokenizer",
]
