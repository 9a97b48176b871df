"""Audio tokenizer configs: the model (:class:`AudioTokenizerConfig`) and its trainer (:class:`AudioTrainConfig`).

:class:`AudioTokenizerRecipe` joins the two for ``omni tokenizer train audio`` and
``recipes/tokenizers/audio.yaml`` (keys ``tokenizer.*`` and ``train.*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import check, check_choice

WHISPER_FRAME_RATE = 100
"""Whisper log-mel frames per second (hop 160 samples at 16 kHz)."""
ENCODER_RATE = 50
"""Whisper encoder positions per second (its second conv has stride 2)."""


@dataclass
class AudioTokenizerConfig:
    """Whisper log-mel + whisper AudioEncoder + VQ codes, with a token-to-mel decoder (see tokenizers/audio.py)."""

    n_mels: int = 80
    """Mel bins of whisper's front end: 80 (whisper up to large-v2) or 128 (large-v3)."""
    n_state: int = 128
    """Encoder width (whisper's n_audio_state; tiny is 384)."""
    n_head: int = 4
    """Encoder attention heads (must divide n_state)."""
    n_layer: int = 2
    """Encoder transformer blocks (whisper tiny has 4)."""
    chunk_seconds: float = 4.0
    """Encoder window: clips are cut into chunks this long, the last one padded with silence (whisper: 30)."""
    token_rate: float = 25.0
    """Code steps per second: 50, 25 (CosyVoice, default) or 12.5 (GLM-4-Voice)."""
    code_dim: int = 64
    """Width of the latent that is quantized."""
    codebook_size: int = 256
    """Codes per codebook; codes are integers in [0, codebook_size)."""
    codebook_dim: int = 0
    """Dimension of the codebook lookup (0: code_dim); smaller factorizes codes (ViT-VQGAN) for better usage."""
    cosine_codebook: bool = False
    """Match l2-normalized latents to l2-normalized codes (cosine similarity; ViT-VQGAN)."""
    num_quantizers: int = 1
    """1: a single codebook; more: residual VQ, codes [T'*Q] step-major (all levels of step 1, then step 2, ...)."""
    commitment_weight: float = 0.25
    """Weight of the VQ-VAE commitment loss."""
    codebook_decay: float = 0.9
    """EMA decay of the codebook updates."""
    dead_code_threshold: float = 2.0
    """Codes whose EMA cluster size falls below this are re-seeded from the batch (keeps usage high)."""
    kmeans_init: bool = True
    """Initialize the codebook by k-means on the first batch."""
    decoder_channels: int = 128
    """Width of the token-to-mel decoder."""
    decoder_blocks: int = 3
    """Residual conv blocks of the decoder at token rate (dilations 1, 2, 4, ...)."""
    decoder_frame_blocks: int = 1
    """Residual conv blocks of the decoder at mel-frame rate, after upsampling."""
    whisper_checkpoint: str = ""
    """A whisper.load_model-format file to initialize the encoder from ('' = random init); its dims win."""
    freeze_encoder: bool = False
    """Keep the encoder weights fixed while training (with a pretrained whisper_checkpoint)."""
    griffin_lim_iters: int = 32
    """Griffin-Lim iterations of the mel-to-waveform step."""
    seed: int = 0
    """Seed of the weight initialization."""

    def __post_init__(self) -> None:
        check_choice(self.n_mels, "n_mels", (80, 128))
        check(16 <= self.n_state <= 4096 and self.n_state % 2 == 0, "n_state", self.n_state,
              "an even integer in [16, 4096]")
        check(self.n_head >= 1 and self.n_state % self.n_head == 0, "n_head", self.n_head,
              f"a positive divisor of n_state={self.n_state}")
        check(0 <= self.n_layer <= 64, "n_layer", self.n_layer, "in [0, 64]")
        check_choice(float(self.token_rate), "token_rate", (50.0, 25.0, 12.5))
        positions = self.chunk_seconds * ENCODER_RATE
        check(0.08 <= self.chunk_seconds <= 30.0 and abs(positions - round(positions)) < 1e-6
              and round(positions) % self.downsample == 0, "chunk_seconds", self.chunk_seconds,
              f"seconds in [0.08, 30] that hold a whole number of tokens at token_rate={self.token_rate} "
              f"(a multiple of {1 / self.token_rate:g})")
        check(4 <= self.code_dim <= 1024, "code_dim", self.code_dim, "in [4, 1024]")
        check(0 <= self.codebook_dim <= 1024, "codebook_dim", self.codebook_dim, "in [0, 1024] (0: code_dim)")
        check(2 <= self.codebook_size <= 65536, "codebook_size", self.codebook_size, "in [2, 65536]")
        check(1 <= self.num_quantizers <= 32, "num_quantizers", self.num_quantizers, "in [1, 32]")
        check(self.commitment_weight >= 0, "commitment_weight", self.commitment_weight, ">= 0")
        check(0.0 < self.codebook_decay < 1.0, "codebook_decay", self.codebook_decay, "in (0, 1)")
        check(self.dead_code_threshold >= 0, "dead_code_threshold", self.dead_code_threshold, ">= 0")
        check(8 <= self.decoder_channels <= 4096, "decoder_channels", self.decoder_channels, "in [8, 4096]")
        check(0 <= self.decoder_blocks <= 32, "decoder_blocks", self.decoder_blocks, "in [0, 32]")
        check(0 <= self.decoder_frame_blocks <= 32, "decoder_frame_blocks", self.decoder_frame_blocks, "in [0, 32]")
        check(1 <= self.griffin_lim_iters <= 1000, "griffin_lim_iters", self.griffin_lim_iters, "in [1, 1000]")

    @property
    def downsample(self) -> int:
        """Encoder positions (50 Hz) per code step: 1, 2 or 4."""
        return int(round(ENCODER_RATE / self.token_rate))

    @property
    def n_ctx(self) -> int:
        """Encoder positions per chunk (whisper's n_audio_ctx; 1500 for 30 s)."""
        return int(round(self.chunk_seconds * ENCODER_RATE))

    @property
    def frames_per_token(self) -> int:
        """Log-mel frames (100 Hz) per code step."""
        return 2 * self.downsample


@dataclass
class AudioTrainConfig:
    """Training of the audio tokenizer: L1 on log-mel plus the VQ commitment loss, AdamW."""

    steps: int = 600
    """Optimizer steps (training also stops at time_limit_s)."""
    time_limit_s: float = 0.0
    """Stop after this many seconds of training (0: no limit)."""
    batch_size: int = 16
    """Chunks per step; each is chunk_seconds long, cut at random from a clip (short clips padded with silence)."""
    lr: float = 2e-3
    """Peak learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: off)."""
    max_clips: int = 100_000
    """Read at most this many clips from --data (they are held in memory)."""
    num_threads: int = 2
    """torch CPU threads."""
    log_every: int = 50
    """Write a metrics.jsonl row every this many steps."""
    save_every: int = 100
    """Write a resumable checkpoint (OUT/step_XXXXXX) every this many steps (0: only at the end)."""
    tensorboard: bool = False
    """Also log the metrics.jsonl scalars to TensorBoard (OUT/tensorboard/), as the decoder's train.tensorboard."""
    seed: int = 0
    """Seed of the data order and crops."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", self.steps, ">= 1")
        check(self.time_limit_s >= 0, "time_limit_s", self.time_limit_s, ">= 0")
        check(1 <= self.batch_size <= 4096, "batch_size", self.batch_size, "in [1, 4096]")
        check(0 < self.lr < 1, "lr", self.lr, "in (0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0")
        check(self.max_clips >= 1, "max_clips", self.max_clips, ">= 1")
        check(1 <= self.num_threads <= 256, "num_threads", self.num_threads, "in [1, 256]")
        check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        check(self.save_every >= 0, "save_every", self.save_every, ">= 0")


@dataclass
class AudioTokenizerRecipe:
    """What `omni tokenizer train audio` reads: the tokenizer and its training."""

    tokenizer: AudioTokenizerConfig = field(default_factory=AudioTokenizerConfig)
    """The audio tokenizer's architecture."""
    train: AudioTrainConfig = field(default_factory=AudioTrainConfig)
    """How it is trained."""
