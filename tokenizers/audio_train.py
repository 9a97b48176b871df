"""Training and evaluation of the whisper-VQ audio tokenizer (:mod:`omni.tokenizers.audio`).

Data: audio folders (searched recursively) and WebDataset ``.tar`` shards (their ``.wav``,
``.flac`` and ``.ogg`` members; other members belong to other modalities and are ignored). Files
are read with soundfile (no ffmpeg), averaged to mono and resampled to 16 kHz. Empty,
silent-only, corrupt and unsupported (.mp3, .m4a, ...) files are skipped and counted, never fatal.

Training is a VQ-VAE on whisper log-mel: windows of exactly ``chunk_seconds`` (the encoder's
window, see the module docstring of :mod:`omni.tokenizers.audio`) are cut at random, token-aligned,
from the clips; loss = L1(decoded log-mel, log-mel) + commitment loss; AdamW with warmup and
cosine decay. Evaluation reports mel L1 (and that of an untrained decoder on the same codes),
codebook usage, tokens per second, envelope correlation and encode/decode real-time factors.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omni.config.audio_tokenizer import AudioTokenizerRecipe
from omni.errors import OmniError
from omni.tokenizers.audio import SAMPLE_RATE, WhisperVQ, WhisperVQAudioTokenizer, mel_to_wave

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
"""Read through soundfile."""
UNSUPPORTED_EXTENSIONS = (".mp3", ".m4a", ".aac", ".opus", ".wma", ".webm", ".mp4", ".amr", ".aiff", ".aif")
"""Audio formats that are counted as skipped (they would need ffmpeg)."""
SILENCE = 1e-4
"""Clips whose peak stays below this are silent-only and skipped."""


# ---------------------------------------------------------------------------------------------
# Reading audio
# ---------------------------------------------------------------------------------------------
@dataclass
class Clip:
    name: str
    wave: np.ndarray
    """float32 [T] at 16 kHz, mono."""

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLE_RATE


@dataclass
class ReadStats:
    """What reading a data source found: clips kept and files skipped, by reason."""

    clips: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, name)

    def summary(self) -> str:
        s = f"{self.clips} clips, {self.seconds:.1f} s of audio"
        if self.skipped:
            s += "; skipped " + ", ".join(f"{n} {r} (e.g. {self.examples[r]})" for r, n in sorted(self.skipped.items()))
        return s

    def to_json(self) -> dict:
        return {"clips": self.clips, "seconds": round(self.seconds, 3), "skipped": dict(self.skipped)}


def decode_audio(data: bytes | str | os.PathLike, name: str, stats: ReadStats) -> np.ndarray | None:
    """Bytes or a path of a wav/flac/ogg file -> float32 mono [T16] at 16 kHz, or None (counted in ``stats``)."""
    import soundfile as sf

    from omni.tokenizers.audio import to_mono_16k

    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else str(data)
        wave, sr = sf.read(src, dtype="float32", always_2d=True)  # [T, C]
    except Exception:  # noqa: BLE001 - libsndfile raises several types for bad files
        stats.skip("corrupt or unreadable", name)
        return None
    if wave.shape[0] == 0:
        stats.skip("empty", name)
        return None
    if not np.isfinite(wave).all():
        stats.skip("corrupt or unreadable", name)
        return None
    if float(np.abs(wave).max()) < SILENCE:
        stats.skip("silent", name)
        return None
    return to_mono_16k(torch.from_numpy(wave.T.copy()), sr).numpy()


def _sources(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise OmniError("no audio data given")
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise OmniError(f"audio data not found: {p} (give a folder of wav/flac/ogg files or .tar shards)")
    return out


def iter_clips(data, stats: ReadStats, limit: int | None = None) -> Iterator[Clip]:
    """Clips from folders, audio files and WebDataset .tar shards, in a fixed (sorted) order."""

    def keep(wave: np.ndarray | None, name: str) -> Clip | None:
        if wave is None:
            return None
        stats.clips += 1
        stats.seconds += len(wave) / SAMPLE_RATE
        return Clip(name, wave)

    n = 0
    for path in _sources(data):
        if limit is not None and n >= limit:
            return
        suffix = path.suffix.lower()
        if suffix == ".tar":
            try:
                with tarfile.open(path) as tar:
                    for member in tar:
                        if limit is not None and n >= limit:
                            return
                        msuf = Path(member.name).suffix.lower()
                        name = f"{path}:{member.name}"
                        if not member.isfile():
                            continue
                        if msuf in UNSUPPORTED_EXTENSIONS:
                            stats.skip("unsupported format", name)
                        elif msuf in AUDIO_EXTENSIONS:
                            f = tar.extractfile(member)
                            clip = keep(decode_audio(f.read() if f else b"", name, stats), name)
                            if clip is not None:
                                n += 1
                                yield clip
            except (tarfile.TarError, OSError):
                stats.skip("corrupt or unreadable", str(path))
        elif suffix in AUDIO_EXTENSIONS:
            clip = keep(decode_audio(path, str(path), stats), str(path))
            if clip is not None:
                n += 1
                yield clip
        elif suffix in UNSUPPORTED_EXTENSIONS:
            stats.skip("unsupported format", str(path))


def load_clips(data, limit: int | None = None) -> tuple[list[Clip], ReadStats]:
    stats = ReadStats()
    clips = list(iter_clips(data, stats, limit))
    if not clips:
        raise OmniError(f"no usable audio in {data}: {stats.summary()} (supported: {', '.join(AUDIO_EXTENSIONS)} "
                        "files in folders or WebDataset .tar shards)")
    return clips, stats


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def energy_envelope(wave: np.ndarray, frame: int = 320, floor_db: float = -60.0) -> np.ndarray:
    """Frame energies in dB [frames] (20 ms frames at 16 kHz), floored ``floor_db`` below the loudest."""
    w = np.asarray(wave, dtype=np.float64)
    n = len(w) // frame
    e = 10 * np.log10((w[: n * frame].reshape(n, frame) ** 2).mean(1) + 1e-12)
    return np.maximum(e, e.max() + floor_db) if n else e


def envelope_correlation(a: np.ndarray, b: np.ndarray, frame: int = 320) -> float:
    """Pearson correlation of the energy envelopes of two 16 kHz waves (over their common length)."""
    ea, eb = energy_envelope(a, frame), energy_envelope(b, frame)
    n = min(len(ea), len(eb))
    if n < 2 or ea[:n].std() == 0 or eb[:n].std() == 0:
        return 0.0
    return float(np.corrcoef(ea[:n], eb[:n])[0, 1])


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
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_audio_tokenizer(data, recipe: AudioTokenizerRecipe | None = None, out: str | os.PathLike | None = None,
                          progress: bool = True) -> tuple[WhisperVQAudioTokenizer, dict]:
    """Train on ``data`` (folders / files / shards); with ``out``, save a tokenizer folder there
    (weights, config.yaml, tokenizer.json, recipe.yaml, train_log.jsonl). Returns (tokenizer, summary)."""
    recipe = recipe or AudioTokenizerRecipe()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.train.num_threads)
    try:
        return _train(data, recipe, out, progress)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(data, recipe: AudioTokenizerRecipe, out, progress: bool) -> tuple[WhisperVQAudioTokenizer, dict]:
    from omni.config import save_config
    from omni.io import atomic_write_text
    from omni.tokenizers.base import save_tokenizer

    tcfg = recipe.train
    torch.manual_seed(tcfg.seed)
    clips, stats = load_clips(data, tcfg.max_clips)
    if progress:
        print(f"audio data: {stats.summary()}")
    tok = WhisperVQAudioTokenizer.from_config(recipe.tokenizer)
    model = tok.model.train()
    if tok.config.freeze_encoder:
        model.encoder.requires_grad_(False)
    windows = _Windows(tok, clips, tcfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.99))

    log_lines: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, desc="audio tokenizer", unit="step")
    t0 = time.perf_counter()
    step = 0
    last: dict = {}
    for step in range(tcfg.steps):
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
        if (step + 1) % tcfg.log_every == 0 or step == 0:
            log_lines.append(json.dumps(last))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(l1=f"{last['mel_l1']:.3f}", usage=f"{last['batch_usage']:.2f}")
        if tcfg.time_limit_s and elapsed >= tcfg.time_limit_s:
            break
    if bar is not None:
        bar.close()
    model.eval()
    summary = {"steps": step + 1, "train_seconds": round(time.perf_counter() - t0, 1), "data": stats.to_json(),
               "final": last}
    if out is not None:
        d = save_tokenizer(tok, out)
        save_config(recipe, d / "recipe.yaml")
        if not log_lines or log_lines[-1] != json.dumps(last):
            log_lines.append(json.dumps(last))
        atomic_write_text(d / "train_log.jsonl", "\n".join(log_lines) + "\n")
        atomic_write_text(d / "train_summary.json", json.dumps(summary, indent=1) + "\n")
    return tok, summary


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_audio_tokenizer(tok: WhisperVQAudioTokenizer, data, max_clips: int = 200) -> dict:
    """Reconstruction and efficiency of ``tok`` on the clips of ``data``; a JSON-ready dict.

    mel_l1: mean |decoded log-mel - log-mel| (whisper's scale) over all frames;
    mel_l1_untrained_decoder: the same for a freshly initialized decoder fed the same codes;
    mel_l1_mean_baseline: predicting each mel bin's mean over the evaluated clips (a constant);
    codebook_usage: distinct codes used / codebook size (averaged over residual levels);
    code_perplexity: exp(entropy) of the code distribution;
    envelope_correlation: mean over clips of the correlation of 20 ms energy envelopes (dB)
    between input and decoded wave; encode_rtf / decode_rtf: seconds of compute per second of
    audio (decode includes Griffin-Lim; vocoder_rtf is that part alone).
    """
    clips, stats = load_clips(data, max_clips)
    cfg = tok.config
    model = tok.model.eval()
    torch.manual_seed(cfg.seed + 1)
    fresh = WhisperVQ(cfg).decoder.eval()  # the untrained-decoder reference
    q = cfg.num_quantizers
    all_codes, targets = [], []
    l1_sum = l1_fresh_sum = frames = 0.0
    t_enc = t_dec = t_voc = seconds = 0.0
    env = []
    for clip in clips:
        wave = torch.from_numpy(clip.wave)
        seconds += clip.seconds
        t = time.perf_counter()
        codes = tok.encode(wave, SAMPLE_RATE)
        t_enc += time.perf_counter() - t
        t = time.perf_counter()
        mel_hat = tok.decode_mel(codes)  # [n_mels, F]
        t_dec += time.perf_counter() - t
        t = time.perf_counter()
        wave_hat = mel_to_wave(mel_hat, cfg.griffin_lim_iters)
        t_voc += time.perf_counter() - t
        target = tok.mel_chunks(wave)[0].permute(1, 0, 2).reshape(cfg.n_mels, -1)[:, : mel_hat.shape[1]]
        z = model.quantizer.get_output_from_indices(tok._steps(codes))
        l1_sum += (mel_hat - target).abs().sum().item()
        l1_fresh_sum += (fresh(z)[0] - target).abs().sum().item()
        frames += target.numel()
        targets.append(target)
        all_codes.append(codes.reshape(-1, q))
        env.append(envelope_correlation(clip.wave, wave_hat))
    codes = torch.cat(all_codes)  # [N, Q]
    usage, perplexity = [], []
    for level in range(q):
        counts = torch.bincount(codes[:, level], minlength=cfg.codebook_size).double()
        p = counts[counts > 0] / counts.sum()
        usage.append((counts > 0).sum().item() / cfg.codebook_size)
        perplexity.append(math.exp(-(p * p.log()).sum().item()))
    mels = torch.cat(targets, 1)  # [n_mels, all frames]
    mean_l1 = (mels - mels.mean(1, keepdim=True)).abs().mean().item()
    return {
        "clips": len(clips),
        "seconds": round(seconds, 2),
        "mel_l1": l1_sum / frames,
        "mel_l1_untrained_decoder": l1_fresh_sum / frames,
        "mel_l1_mean_baseline": mean_l1,
        "codebook_usage": sum(usage) / q,
        "code_perplexity": sum(perplexity) / q,
        "codebook_size": cfg.codebook_size,
        "tokens": codes.numel(),
        "tokens_per_second": codes.numel() / seconds,
        "envelope_correlation": float(np.mean(env)),
        "envelope_correlation_min": float(np.min(env)),
        "encode_rtf": t_enc / seconds,
        "decode_rtf": (t_dec + t_voc) / seconds,
        "vocoder_rtf": t_voc / seconds,
        "data": stats.to_json(),
        "torch_threads": torch.get_num_threads(),
    }


__all__ = [
    "Clip",
    "ReadStats",
    "decode_audio",
    "envelope_correlation",
    "evaluate_audio_tokenizer",
    "iter_clips",
    "load_clips",
    "train_audio_tokenizer",
]
