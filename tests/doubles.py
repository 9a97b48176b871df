"""Test doubles for the modality-tokenizer interface (tests only; the real ones live in tokenizers/).

``MeanColorImageTokenizer`` quantizes the mean color of each cell of a fixed grid to one of
``levels**3`` colors; ``EnvelopeAudioTokenizer`` quantizes the RMS envelope of 40 ms frames.
Both are deterministic, invertible up to quantization, and save/load like real tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from omni.tokenizers.base import AudioTokenizer, ImageTokenizer, register


class MeanColorImageTokenizer(ImageTokenizer):
    kind = "test-mean-color"

    def __init__(self, grid: int = 4, cell: int = 4, levels: int = 4):
        self.g, self.cell, self.levels = grid, cell, levels

    @property
    def codebook_size(self) -> int:
        return self.levels**3

    @property
    def grid(self):
        return (self.g, self.g)

    @property
    def image_size(self):
        return (self.g * self.cell, self.g * self.cell)

    def encode(self, images):  # [B,3,H,W] -> [B,g,g]
        cells = F.avg_pool2d(images, self.cell)  # [B,3,g,g]
        q = (cells * (self.levels - 1)).round().long().clamp(0, self.levels - 1)
        return q[:, 0] * self.levels**2 + q[:, 1] * self.levels + q[:, 2]

    def decode(self, codes):  # [B,g,g] -> [B,3,H,W]
        L = self.levels
        rgb = torch.stack([codes // L**2, (codes // L) % L, codes % L], 1).float() / (L - 1)
        return F.interpolate(rgb, scale_factor=self.cell, mode="nearest")

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps({"grid": self.g, "cell": self.cell, "levels": self.levels}))

    @classmethod
    def load(cls, directory):
        return cls(**json.loads((Path(directory) / "config.json").read_text()))


class EnvelopeAudioTokenizer(AudioTokenizer):
    kind = "test-envelope"

    def __init__(self, levels: int = 32, frame_ms: int = 40, rate: int = 8000):
        self.levels, self.frame_ms, self.rate = levels, frame_ms, rate

    @property
    def codebook_size(self) -> int:
        return self.levels

    @property
    def sample_rate(self) -> int:
        return self.rate

    @property
    def tokens_per_second(self) -> float:
        return 1000 / self.frame_ms

    def encode(self, wave, sample_rate):
        wave = torch.as_tensor(wave, dtype=torch.float32)
        if sample_rate != self.rate:  # nearest-sample resampling is plenty for a test double
            idx = (torch.arange(int(len(wave) * self.rate / sample_rate)) * sample_rate / self.rate).long()
            wave = wave[idx.clamp(max=len(wave) - 1)]
        hop = self.rate * self.frame_ms // 1000
        n = max(1, -(-len(wave) // hop))
        frames = F.pad(wave, (0, n * hop - len(wave))).reshape(n, hop)
        rms = frames.pow(2).mean(1).sqrt()
        return (rms.clamp(0, 1) * (self.levels - 1)).round().long()

    def decode(self, codes):
        hop = self.rate * self.frame_ms // 1000
        amp = codes.float() / (self.levels - 1)
        t = torch.arange(hop) / self.rate
        tone = torch.sin(2 * torch.pi * 220 * t) * 2**0.5
        return (amp[:, None] * tone[None]).reshape(-1), self.rate

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(
            json.dumps({"levels": self.levels, "frame_ms": self.frame_ms, "rate": self.rate}))

    @classmethod
    def load(cls, directory):
        return cls(**json.loads((Path(directory) / "config.json").read_text()))


register(MeanColorImageTokenizer.kind, MeanColorImageTokenizer)
register(EnvelopeAudioTokenizer.kind, EnvelopeAudioTokenizer)
