"""Audio tokenizer: whisper log-mel -> whisper AudioEncoder -> downsampling -> VQ codes, and back.

Papers:

* Whisper (Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision", 2022,
  https://arxiv.org/abs/2212.04356): the 80/128-bin log-mel front end (``whisper.audio``) and the
  encoder architecture (``whisper.model.AudioEncoder``: two convs, the second of stride 2, so
  100 mel frames/s become 50 positions/s, then pre-norm transformer blocks).
* VQ-VAE (van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017,
  https://arxiv.org/abs/1711.00937): a discrete bottleneck trained with a reconstruction loss plus
  a commitment loss, codebook updated by EMA (quantizers from vector-quantize-pytorch, with k-means
  init and dead-code re-seeding to keep the codebook in use).
* Token rates follow the speech tokenizers that put whisper encoders in front of a VQ:
  CosyVoice's S3 tokenizer at 25 Hz (Du et al. 2024, https://arxiv.org/abs/2407.05407) and
  GLM-4-Voice's tokenizer at 12.5 Hz (Zeng et al. 2024, https://arxiv.org/abs/2412.02612).
  Both are trained with an ASR objective; this one is trained as a VQ-VAE (L1 on log-mel), so it
  needs no transcripts.

Data flow for one clip (shapes for the default 25 Hz, ``chunk_seconds=4``)::

    wave [T] any rate, mono ─ resample ─► [T16] at 16 kHz
      ─ zero-pad to whole chunks ─► log-mel [n_mels, C*400]  (whisper.audio.log_mel_spectrogram)
      ─ chunks [C, n_mels, 400] ─ AudioEncoder ─► [C, 200, n_state]  (50 Hz)
      ─ strided conv ─► [C, 100, code_dim]  (25 Hz) ─ VQ ─► codes [C*100] ─ keep ceil(T16/640) ─► [T']
    decode: codes [T'] ─ codebook ─► [T', code_dim] ─ conv decoder ─► log-mel [n_mels, 4*T']
      ─ Griffin-Lim ─► wave [640*T'] at 16 kHz

The encoder-window rule. Whisper's AudioEncoder adds a positional table of exactly ``n_ctx``
positions and refuses other lengths. Every clip is cut into chunks of ``chunk_seconds`` (``n_ctx =
50 * chunk_seconds`` positions; whisper's own is 30 s / 1500), and the last chunk is padded with
silence to full length, exactly as whisper pads every input to 30 s. Codes that cover only padding
are dropped: a clip of T16 samples gives ``ceil(T16 / samples_per_token)`` codes, so a decoded
clip is at most one token period longer than the input. Nothing is ever truncated. Training cuts
windows of the same chunk length, so the encoder sees the same shapes in training and use.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from omni.config import load_config, save_config
from omni.config.audio_tokenizer import AudioTokenizerConfig
from omni.errors import OmniError
from omni.io import atomic_write_bytes
from omni.tokenizers.base import AudioTokenizer, settle_codebooks

SAMPLE_RATE = 16000
"""Whisper's sample rate; every clip is resampled to it."""
HOP = 160
"""Samples per log-mel frame (10 ms)."""
N_FFT = 400
NNLS_ITERS = 10
"""Multiplicative-update iterations of the mel-to-spectrum inversion."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


# ---------------------------------------------------------------------------------------------
# Signal helpers
# ---------------------------------------------------------------------------------------------
def to_mono_16k(wave, sample_rate: int) -> torch.Tensor:
    """float wave [T] or [C,T] at ``sample_rate`` -> float32 [T16] at 16 kHz (soxr resampling)."""
    w = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave).float()
    if w.dim() == 2:  # [C,T] -> [T]
        w = w.mean(0)
    if w.dim() != 1:
        raise OmniError(f"audio must be a wave [T] or [C,T], got shape {tuple(w.shape)}")
    if int(sample_rate) <= 0:
        raise OmniError(f"sample_rate must be positive, got {sample_rate}")
    if not torch.isfinite(w).all():
        raise OmniError("audio holds NaN or infinite samples")
    if int(sample_rate) != SAMPLE_RATE and w.numel():
        import soxr

        w = torch.from_numpy(soxr.resample(w.numpy(), int(sample_rate), SAMPLE_RATE, quality="HQ")).float()
    return w


def log_mel(wave16k: torch.Tensor, n_mels: int) -> torch.Tensor:
    """whisper's log-mel of ONE clip: float [T16] -> [n_mels, T16 // 160].

    Values are whisper's: log10 power floored at (clip max - 8), then (x + 4) / 4. The floor is
    relative to the clip's loudest frame, so call this once per clip (never on a batch).
    """
    import whisper.audio

    return whisper.audio.log_mel_spectrogram(wave16k.float(), n_mels=n_mels)


@functools.cache
def _mel_basis(n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """whisper's mel filters [n_mels, 201] and their pseudo-inverse [201, n_mels], float64."""
    import whisper.audio

    basis = whisper.audio.mel_filters("cpu", n_mels).double()
    return basis, torch.linalg.pinv(basis)


def mel_to_wave(mel: torch.Tensor, n_iter: int = 32) -> np.ndarray:
    """Invert whisper's log-mel [n_mels, F] to a wave [F*160] at 16 kHz.

    Undo the (x+4)/4 scaling and log10 to get mel power, map it back to a linear power spectrum
    with non-negative least squares against whisper's own mel filters, then recover the phase
    with Griffin-Lim (:func:`griffin_lim`, deterministic).
    """
    n_mels, frames = mel.shape
    power = torch.pow(10.0, 4.0 * mel.detach().cpu().double() - 4.0)  # [n_mels, F]
    basis, basis_pinv = _mel_basis(n_mels)
    # Non-negative least squares  min |basis @ spec - power|, spec >= 0: start from the clipped
    # pseudo-inverse, refine with multiplicative updates (Lee & Seung 2001), which keep spec >= 0.
    # librosa.util.nnls solves the same problem with L-BFGS-B but takes ~0.6 s per second of audio.
    # (torch, not numpy: it follows torch.set_num_threads.)
    spec = (basis_pinv @ power).clamp(min=1e-12)  # [201, F]
    numer = basis.T @ power  # [201, F]
    for _ in range(NNLS_ITERS):
        spec *= numer / (basis.T @ (basis @ spec) + 1e-12)
    mag = spec.sqrt()
    # whisper drops the STFT's last frame (a centered STFT of F*160 samples has F+1 frames):
    # repeat the last frame so Griffin-Lim's STFT and iSTFT agree on F+1 frames of F*160 samples.
    mag = torch.cat([mag, mag[:, -1:]], dim=1)
    return griffin_lim(mag.float(), n_iter, length=frames * HOP).numpy()


def griffin_lim(mag: torch.Tensor, n_iter: int, length: int, momentum: float = 0.99) -> torch.Tensor:
    """Phase recovery for a magnitude spectrogram [201, F+1] -> wave [length] (whisper's STFT).

    Fast Griffin-Lim (Griffin & Lim 1984; momentum of Perraudin et al. 2013), the algorithm of
    librosa.griffinlim, written on torch.stft/istft: librosa's first call in a process spends
    5-7 s compiling numba kernels, and torch follows torch.set_num_threads. Random initial
    phases from a fixed seed, so decoding is deterministic.
    """
    window = torch.hann_window(N_FFT, dtype=mag.dtype)
    gen = torch.Generator().manual_seed(0)
    angles = torch.polar(torch.ones_like(mag), 2 * math.pi * torch.rand(mag.shape, generator=gen, dtype=mag.dtype))
    prev = torch.zeros_like(angles)
    for _ in range(n_iter):
        wave = torch.istft(mag * angles, N_FFT, HOP, window=window, length=length)
        rebuilt = torch.stft(wave, N_FFT, HOP, window=window, return_complex=True)  # [201, F+1]
        angles = rebuilt - (momentum / (1 + momentum)) * prev
        angles = angles / (angles.abs() + 1e-16)
        prev = rebuilt
    return torch.istft(mag * angles, N_FFT, HOP, window=window, length=length)


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------
class ResBlock1d(nn.Module):
    """Pre-activation residual block: x + conv1x1(gelu(conv_k(gelu(x)))), dilated for a wider view."""

    def __init__(self, channels: int, dilation: int = 1, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,L] -> [B,C,L]
        return x + self.proj(F.gelu(self.conv(F.gelu(x))))


class MelDecoder(nn.Module):
    """Quantized latents [B,T',D] -> log-mel [B,n_mels,T'*up]: convs at token rate, upsample, convs at mel rate."""

    def __init__(self, code_dim: int, n_mels: int, channels: int, blocks: int, frame_blocks: int, up: int):
        super().__init__()
        self.up = up
        self.inp = nn.Conv1d(code_dim, channels, 3, padding=1)
        # Most of the work at token rate (up x fewer positions than mel frames): cheap on a CPU.
        self.token_blocks = nn.Sequential(*[ResBlock1d(channels, 2**i) for i in range(blocks)])
        self.upsample = nn.ConvTranspose1d(channels, channels, up, stride=up)  # [B,C,T'] -> [B,C,T'*up]
        self.frame_blocks = nn.Sequential(*[ResBlock1d(channels, 1) for _ in range(frame_blocks)])
        self.out = nn.Conv1d(channels, n_mels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.token_blocks(self.inp(z.transpose(1, 2)))  # [B,C,T']
        x = self.frame_blocks(self.upsample(x))  # [B,C,T'*up]
        return self.out(F.gelu(x))  # [B,n_mels,T'*up]


class WhisperVQ(nn.Module):
    """The tokenizer network: whisper AudioEncoder + strided conv + VQ, and the mel decoder."""

    def __init__(self, cfg: AudioTokenizerConfig):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ, VectorQuantize
        from whisper.model import AudioEncoder

        self.cfg = cfg
        self.encoder = AudioEncoder(cfg.n_mels, cfg.n_ctx, cfg.n_state, cfg.n_head, cfg.n_layer)
        ds = cfg.downsample
        self.down = nn.Conv1d(cfg.n_state, cfg.code_dim, ds, stride=ds)  # 50 Hz -> token rate
        vq_args = dict(dim=cfg.code_dim, codebook_size=cfg.codebook_size, decay=cfg.codebook_decay,
                       commitment_weight=cfg.commitment_weight, kmeans_init=cfg.kmeans_init, kmeans_iters=10,
                       threshold_ema_dead_code=cfg.dead_code_threshold, use_cosine_sim=cfg.cosine_codebook,
                       codebook_dim=cfg.codebook_dim or None)
        if cfg.num_quantizers == 1:
            self.quantizer = VectorQuantize(**vq_args)
        else:
            self.quantizer = ResidualVQ(num_quantizers=cfg.num_quantizers, **vq_args)
        self.decoder = MelDecoder(cfg.code_dim, cfg.n_mels, cfg.decoder_channels, cfg.decoder_blocks,
                                  cfg.decoder_frame_blocks, cfg.frames_per_token)

    def latents(self, mel: torch.Tensor) -> torch.Tensor:
        """Chunks of log-mel [B, n_mels, 2*n_ctx] -> latents [B, n_ctx/ds, code_dim]."""
        h = self.encoder(mel)  # [B, n_ctx, n_state]
        return self.down(h.transpose(1, 2)).transpose(1, 2)

    def quantize(self, z: torch.Tensor):
        """latents [B,T',D] -> (quantized [B,T',D], codes [B,T'] or [B,T',Q], commitment loss)."""
        q, codes, loss = self.quantizer(z)
        return q, codes, loss.sum()

    def forward(self, mel: torch.Tensor):
        """log-mel chunks [B, n_mels, 2*n_ctx] -> (reconstruction, codes, commitment loss)."""
        q, codes, commit = self.quantize(self.latents(mel))
        return self.decoder(q), codes, commit


def load_whisper_encoder(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a whisper checkpoint (``whisper.load_model(path)``'s format: a dict with ``dims`` and
    ``model_state_dict``) with ``weights_only=True``; returns (dims, encoder state dict)."""
    p = Path(path)
    if not p.is_file():
        raise OmniError(f"whisper_checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        dims, state = ckpt["dims"], ckpt["model_state_dict"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise OmniError(f"{p} is not a whisper checkpoint (a dict with 'dims' and 'model_state_dict'): {e}") from None
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not enc:
        raise OmniError(f"{p} holds no encoder.* weights")
    return dims, enc


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
class WhisperVQAudioTokenizer(AudioTokenizer):
    """Clips <-> codes [T'] at :attr:`tokens_per_second`; ``decode`` returns a 16 kHz wave."""

    kind: ClassVar[str] = "whisper-vq-audio"

    def __init__(self, config: AudioTokenizerConfig | None = None, model: WhisperVQ | None = None):
        self.config = config or AudioTokenizerConfig()
        if model is None:
            torch.manual_seed(self.config.seed)
            model = WhisperVQ(self.config)
        self.model = model.eval()

    @classmethod
    def from_config(cls, config: AudioTokenizerConfig) -> WhisperVQAudioTokenizer:
        """A fresh (untrained) tokenizer; with ``whisper_checkpoint`` set, the encoder is loaded from
        it and the encoder dims of the config are replaced by the checkpoint's."""
        import dataclasses

        enc_state = None
        if config.whisper_checkpoint:
            dims, enc_state = load_whisper_encoder(config.whisper_checkpoint)
            config = dataclasses.replace(
                config, n_mels=dims["n_mels"], n_state=dims["n_audio_state"], n_head=dims["n_audio_head"],
                n_layer=dims["n_audio_layer"], chunk_seconds=dims["n_audio_ctx"] / 50)
        tok = cls(config)
        if enc_state is not None:
            tok.model.encoder.load_state_dict(enc_state)
        return tok

    # --- interface -----------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def tokens_per_second(self) -> float:
        return self.config.token_rate * self.config.num_quantizers

    @property
    def samples_per_step(self) -> int:
        """16 kHz samples per code step (640 at 25 Hz)."""
        return self.config.frames_per_token * HOP

    def mel_chunks(self, wave16k: torch.Tensor) -> tuple[torch.Tensor, int]:
        """16 kHz wave [T16] -> (log-mel chunks [C, n_mels, 2*n_ctx], number of code steps to keep)."""
        n = wave16k.numel()
        if n == 0:
            raise OmniError("audio clip is empty (0 samples)")
        steps = math.ceil(n / self.samples_per_step)
        chunk = 2 * self.config.n_ctx * HOP  # samples per encoder window
        padded = F.pad(wave16k.float(), (0, math.ceil(n / chunk) * chunk - n))
        mel = log_mel(padded, self.config.n_mels)  # [n_mels, C*2*n_ctx]
        c = mel.shape[1] // (2 * self.config.n_ctx)
        return mel.reshape(self.config.n_mels, c, 2 * self.config.n_ctx).permute(1, 0, 2), steps

    @torch.no_grad()
    def encode(self, wave, sample_rate: int, batch_chunks: int = 16) -> torch.Tensor:
        """float mono wave [T] at ``sample_rate`` -> long codes [T'] (``[T'*Q]`` step-major with residual VQ)."""
        mel, steps = self.mel_chunks(to_mono_16k(wave, sample_rate))
        self.model.eval()
        settle_codebooks(self.model)  # encoding never changes the tokenizer
        codes = []
        for i in range(0, mel.shape[0], batch_chunks):
            _, c, _ = self.model.quantize(self.model.latents(mel[i : i + batch_chunks]))
            codes.append(c.reshape(-1, *c.shape[2:]))  # [chunks*T_chunk] or [chunks*T_chunk, Q]
        return torch.cat(codes)[:steps].reshape(-1).long()

    def _steps(self, codes) -> torch.Tensor:
        """codes [T'] (or [T'*Q]) -> [1, T'] (or [1, T', Q]), validated."""
        c = torch.as_tensor(codes)
        q = self.config.num_quantizers
        if c.dim() != 1 or c.numel() == 0 or c.is_floating_point():
            raise OmniError(f"audio codes must be a non-empty 1-D integer tensor, got shape {tuple(c.shape)} {c.dtype}")
        if c.numel() % q:
            raise OmniError(f"{c.numel()} audio codes is not a multiple of num_quantizers={q}")
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= self.codebook_size:
            raise OmniError(f"audio codes must lie in [0, {self.codebook_size}), got [{lo}, {hi}]")
        c = c.long()[None]
        return c.reshape(1, -1, q) if q > 1 else c

    @torch.no_grad()
    def decode_mel(self, codes) -> torch.Tensor:
        """codes [T'] -> log-mel [n_mels, T'*frames_per_token] (the decoder's output, before the vocoder)."""
        self.model.eval()
        q = self.model.quantizer.get_output_from_indices(self._steps(codes))  # [1, T', code_dim]
        return self.model.decoder(q)[0]

    def decode(self, codes):
        """long codes [T'] -> (float32 wave [T'*samples_per_step], 16000)."""
        mel = self.decode_mel(codes)
        return torch.from_numpy(mel_to_wave(mel, self.config.griffin_lim_iters)), SAMPLE_RATE

    # --- persistence ---------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        atomic_write_bytes(d / WEIGHTS_FILE, save(state, metadata={"kind": self.kind}))
        save_config(self.config, d / CONFIG_FILE)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WhisperVQAudioTokenizer:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (d / name).is_file():
                raise OmniError(f"{d} is not a whisper-vq-audio tokenizer: {name} is missing")
        config = load_config(AudioTokenizerConfig, d / CONFIG_FILE)
        model = WhisperVQ(config)
        try:
            state = load_file(str(d / WEIGHTS_FILE))
            model.load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise OmniError(f"cannot load {d / WEIGHTS_FILE}: {e}") from None
        return cls(config, model)

    def __repr__(self) -> str:
        c = self.config
        return (f"WhisperVQAudioTokenizer({c.token_rate:g} Hz x {c.num_quantizers} codebook(s) of {c.codebook_size}, "
                f"encoder {c.n_layer}x{c.n_state}, chunks of {c.chunk_seconds:g} s)")
