"""The tokenizer evaluation runners: image (PSNR, SSIM, codebook usage, speed) and audio (mel L1, usage,
envelope correlation, real-time factors), and the suites ``omni eval image-tokenizer`` and
``omni eval audio-tokenizer``.

:class:`ImageEvaluator` is what the image tokenizer trainer calls every ``eval_every`` steps and at
the end: it holds a fixed evaluation set (held-out images, or crops of the training images) and
measures a tokenizer on it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from omni.errors import OmniError
from omni.eval.metrics import code_stats, envelope_correlation, pooled_psnr, psnr, ssim
from omni.media import SkipReport
from omni.tokenizers.audio import SAMPLE_RATE, WhisperVQ, mel_to_wave
from omni.tokenizers.audio_train import data_json, load_clips
from omni.tokenizers.image_train import _to_float, iter_images, random_crop


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------
def eval_images(data, size: int, crops_per_image: int, max_images: int, report: SkipReport,
                min_side: int = 1, seed: int = 0, preprocess: Callable | None = None) -> torch.Tensor:
    """The fixed evaluation set: float [N,3,size,size].

    ``crops_per_image > 0``: that many native-resolution random crops per image (seeded);
    ``0``: one image per file, resized and center-cropped by ``preprocess`` (the tokenizer's rule).
    """
    out: list[torch.Tensor] = []
    for i, (_, a) in enumerate(iter_images(data, report, min_side)):
        if crops_per_image == 0:
            out.append(preprocess(_to_float(a)))
        else:
            rng = np.random.default_rng([seed, 1_000_003, i])
            out.extend(random_crop(a, size, (1.0, 1.0), rng, False) for _ in range(crops_per_image))
        if len(out) >= max_images:
            break
    if not out:
        raise OmniError(f"no readable images to evaluate on in {data}: {report}")
    return torch.stack(out[:max_images])


class ImageEvaluator:
    """A fixed evaluation set and the measure of a tokenizer on it: ``evaluator(tok) -> dict``.

    ``data`` None: fixed crops of the training data ``train_data`` (not a generalization figure,
    and :attr:`on` says so). The set is read when first needed, with the tokenizer's own resize rule.
    """

    def __init__(self, data, cfg, train_data=None, log: Callable[[str], None] = print):
        self.data = data if data is not None else train_data
        self.on = "held-out data" if data is not None else "training images (no --eval-data given)"
        self.cfg, self.log = cfg, log
        self.report = SkipReport()
        self.images: torch.Tensor | None = None

    def __call__(self, tok) -> dict:
        if self.images is None:
            c = self.cfg
            self.images = eval_images(self.data, c.model.image_size, c.eval_crops_per_image, c.eval_max_images,
                                      self.report, c.min_image_side, c.seed, tok.preprocess)
            rest = str(self.report).partition(";")[2]  # skipped / converted, if any
            self.log(f"eval set ({self.on}): {len(self.images)} crops of {c.model.image_size} px from "
                     f"{self.report.read} images{';' + rest if rest else ''}")
        return {**evaluate_image_tokenizer(tok, self.images), "eval_on": self.on}


@torch.no_grad()
def evaluate_image_tokenizer(tok, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Reconstruction and code statistics of ``tok`` on ``images`` [N,3,S,S]; restores train mode after."""
    was_training = tok.training
    tok.eval()
    codes, recons = [], []
    t_enc = t_dec = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        t0 = time.perf_counter()
        c = tok.encode(x)
        t1 = time.perf_counter()
        r = tok.decode(c) if tok.config.has_decoder else None
        t2 = time.perf_counter()
        t_enc, t_dec = t_enc + (t1 - t0), t_dec + (t2 - t1)
        codes.append(c)
        if r is not None:
            recons.append(r)
    tok.train(was_training)
    codes_t = torch.cat(codes)
    n = len(images)
    baseline = images.mean(dim=(2, 3), keepdim=True).expand_as(images)  # each image's mean color
    out = {"images": n, "image_size": list(tok.image_size), "grid": list(tok.grid),
           "codebook_size": tok.codebook_size, **code_stats(codes_t, tok.codebook_size),
           "encode_images_per_s": n / max(t_enc, 1e-9),
           "psnr_mean_color_baseline": pooled_psnr(baseline, images),
           "psnr_per_image_mean_color_baseline": float(psnr(baseline, images).mean())}
    if recons:
        rec = torch.cat(recons)
        out.update(psnr=pooled_psnr(rec, images), psnr_per_image=float(psnr(rec, images).mean()),
                   ssim=float(ssim(rec, images).mean()), decode_images_per_s=n / max(t_dec, 1e-9))
        out["psnr_over_baseline"] = out["psnr"] - out["psnr_mean_color_baseline"]
    return out


# ------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_audio_tokenizer(tok, data, max_clips: int = 200) -> dict:
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
    levels = [code_stats(codes[:, level], cfg.codebook_size) for level in range(q)]
    usage = [s["codebook_usage"] for s in levels]
    perplexity = [s["code_perplexity"] for s in levels]
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
        "data": data_json(clips, stats),
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------
# Suites of `omni eval`
# ------------------------------------------------------------------------------------------
def image_suite(checkpoint: str | os.PathLike, data: Sequence[str], cfg, out=None) -> dict:
    """``omni eval image-tokenizer --checkpoint TOKENIZER_OR_BUNDLE --data IMAGES``."""
    from omni.tokenizers.base import load_tokenizer

    if not data:
        raise OmniError("the image-tokenizer suite needs --data (image folders, files, shards or photos:heldout)")
    c = cfg.image
    tok = load_tokenizer(checkpoint, "image")
    report = SkipReport()
    images = eval_images(list(data), tok.image_size[0], c.crops_per_image, c.max_images, report, min_side=1,
                         seed=c.seed, preprocess=tok.preprocess)
    m = evaluate_image_tokenizer(tok, images, batch_size=c.batch_size)
    m["data"] = report.to_json()
    m["mode"] = (f"{c.crops_per_image} native-resolution crops per image" if c.crops_per_image
                 else "whole images, resize + center crop")
    return m


def audio_suite(checkpoint: str | os.PathLike, data: Sequence[str], cfg, out=None) -> dict:
    """``omni eval audio-tokenizer --checkpoint TOKENIZER_OR_BUNDLE --data CLIPS``."""
    from omni.tokenizers.base import load_tokenizer

    if not data:
        raise OmniError("the audio-tokenizer suite needs --data (audio folders, files or shards)")
    tok = load_tokenizer(checkpoint, "audio")
    if not hasattr(tok, "decode_mel"):
        raise OmniError(f"{checkpoint} holds a {tok.kind} tokenizer; the audio-tokenizer suite measures "
                        "whisper-vq-audio ones")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.audio.threads)
    try:
        return evaluate_audio_tokenizer(tok, list(data), max_clips=cfg.audio.max_clips)
    finally:
        torch.set_num_threads(threads)


def write_json(m: dict, path: str | os.PathLike) -> None:
    from omni.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(m, indent=1) + "\n")
