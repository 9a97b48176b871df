"""Reconstruction metrics of tokenizers: PSNR, SSIM, codebook usage and perplexity, energy envelopes.

Pure functions of tensors and arrays; the runners of :mod:`omni.eval.tokenizers` and the tokenizer
trainers' periodic evaluation call them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [B,3,H,W] images in [0,1] -> [B] (capped at 100 dB)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def pooled_psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of the mean squared error over all images and pixels (torchmetrics' default reduction)."""
    mse = (x.double() - y.double()).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of [B,3,H,W] in [0,1] -> [B].

    Gaussian window sigma 1.5, 11 taps, K1=0.01, K2=0.03, mean over the valid region and the
    channels: the figure ``skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)`` gives.
    """
    x, y = x.double(), y.double()
    r = 5
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * 1.5**2))
    g = g / g.sum()
    c = x.shape[1]
    wh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)  # separable: along W, then along H
    wv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(z):
        return F.conv2d(F.conv2d(z, wh, groups=c), wv, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def code_stats(codes: torch.Tensor, codebook_size: int) -> dict:
    """Share of the codebook used and the perplexity (exp entropy) of the code histogram."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codebook_usage": float((counts > 0).sum()) / codebook_size,
            "codes_used": int((counts > 0).sum()),
            "code_perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


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
