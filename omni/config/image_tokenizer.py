"""Image tokenizer configs: the VQ model (:class:`ImageTokenizerConfig`) and its trainer (:class:`ImageTrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import check, check_choice

QUANTIZERS = ("vq", "fsq", "lfq", "nearest")


@dataclass
class ImageTokenizerConfig:
    """A VQGAN-family image tokenizer (Esser et al. 2021): conv encoder, quantizer, conv decoder."""

    image_size: int = 64
    """Square pixel size images are resized and center-cropped to; the grid is image_size // downsample."""
    base_channels: int = 32
    """Channels of the first encoder level (and the last decoder level)."""
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    """Channel multiplier per resolution level; downsample = 2**(len-1) (4 levels: 8x, 5 levels: 16x)."""
    num_res_blocks: int = 1
    """Residual blocks per encoder level (the decoder has one more per level, as in VQGAN)."""
    attn_resolutions: list[int] = field(default_factory=list)
    """Feature-map sizes (pixels per side) whose residual blocks are followed by self-attention."""
    mid_attention: bool = True
    """Self-attention between the two middle residual blocks (Chameleon: attn_type 'vanilla')."""
    latent_channels: int = 64
    """Channels out of the encoder (into the decoder), before quant_conv / after post_quant_conv."""
    embed_dim: int = 32
    """Channels the quantizer sees (quant_conv's output), the dimension of Chameleon's codebook vectors."""
    norm_groups: int = 8
    """GroupNorm groups (Chameleon and VQGAN use 32; every level's channels must divide by it); 0: no normalization."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""
    quantizer: str = "vq"
    """'vq' (VectorQuantize: cosine codes, low-dim lookup, EMA, k-means init, dead-code restart), 'fsq', 'lfq', or 'nearest' (plain VQ-VAE codebook, Chameleon's)."""
    codebook_size: int = 1024
    """Number of codes for vq, lfq (a power of 2) and nearest; fsq's is the product of fsq_levels."""
    codebook_dim: int = 8
    """vq: codes are looked up in this low dimension (project in/out of embed_dim); 0 means embed_dim."""
    use_cosine_sim: bool = True
    """vq: l2-normalize vectors and codes (cosine similarity lookup)."""
    ema_decay: float = 0.9
    """vq: EMA decay of the codebook updates."""
    kmeans_init: bool = True
    """vq: initialize the codebook by k-means on the first batch."""
    kmeans_iters: int = 10
    """vq: k-means iterations of that initialization."""
    dead_code_threshold: float = 1.0
    """vq: codes whose EMA cluster size falls below this are restarted from batch vectors (0: never)."""
    commitment_weight: float = 0.25
    """vq / nearest / lfq: weight of the commitment loss (encoder output pulled toward its code)."""
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    """fsq: quantization levels per channel; codebook_size = their product (8,5,5,5 -> 1000)."""
    lfq_entropy_weight: float = 0.1
    """lfq: weight of the entropy loss that spreads codes over the codebook."""
    local_encoder: bool = False
    """Encode every f x f patch on its own (f = downsample), so a code depends on its patch's pixels
    alone: the same patch always gets the same code. Neighbors leaking into codes let a decoder LM
    read what comes next from the codes instead of from the prompt (omni demo's toy world draws
    objects on whole patches and turns this on). False: the usual overlapping conv encoder."""
    has_decoder: bool = True
    """Whether the tokenizer has a pixel decoder (False for an import of Hugging Face's Chameleon, which ships none)."""

    def __post_init__(self) -> None:
        self.channel_multiplier = list(self.channel_multiplier)
        self.attn_resolutions = list(self.attn_resolutions)
        self.fsq_levels = list(self.fsq_levels)
        check(len(self.channel_multiplier) >= 2 and all(m >= 1 for m in self.channel_multiplier),
              "channel_multiplier", self.channel_multiplier, "at least 2 positive integers (4 levels: 8x, 5: 16x)")
        f = 2 ** (len(self.channel_multiplier) - 1)
        check(self.image_size >= f and self.image_size % f == 0, "image_size", self.image_size,
              f"a positive multiple of the downsample factor {f}")
        check(self.base_channels >= 1, "base_channels", self.base_channels, ">= 1")
        check(self.norm_groups >= 0, "norm_groups", self.norm_groups, ">= 0 (0: no normalization)")
        for m in self.channel_multiplier:
            check(self.norm_groups == 0 or self.base_channels * m % self.norm_groups == 0, "norm_groups",
                  self.norm_groups,
                  f"0 or a divisor of every level's channels (base_channels * channel_multiplier = {self.base_channels * m})")
        check(self.num_res_blocks >= 1, "num_res_blocks", self.num_res_blocks, ">= 1")
        check(all(r >= 1 for r in self.attn_resolutions), "attn_resolutions", self.attn_resolutions,
              "feature-map sizes in pixels (positive integers)")
        check(self.latent_channels >= 1, "latent_channels", self.latent_channels, ">= 1")
        check(self.embed_dim >= 1, "embed_dim", self.embed_dim, ">= 1")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        check_choice(self.quantizer, "quantizer", QUANTIZERS)
        check(2 <= self.codebook_size <= 2**20, "codebook_size", self.codebook_size, "in [2, 1048576]")
        if self.quantizer == "lfq":
            check(self.codebook_size & (self.codebook_size - 1) == 0, "codebook_size", self.codebook_size,
                  "a power of 2 for quantizer='lfq'")
        check(self.codebook_dim >= 0, "codebook_dim", self.codebook_dim, ">= 0 (0 means embed_dim)")
        check(0.0 < self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in (0, 1)")
        check(self.kmeans_iters >= 1, "kmeans_iters", self.kmeans_iters, ">= 1")
        check(self.dead_code_threshold >= 0, "dead_code_threshold", self.dead_code_threshold, ">= 0")
        check(self.commitment_weight >= 0, "commitment_weight", self.commitment_weight, ">= 0")
        check(len(self.fsq_levels) >= 1 and all(lv >= 3 for lv in self.fsq_levels), "fsq_levels", self.fsq_levels,
              "one or more integers >= 3 (for example [8, 5, 5, 5])")
        check(self.lfq_entropy_weight >= 0, "lfq_entropy_weight", self.lfq_entropy_weight, ">= 0")

    @property
    def downsample(self) -> int:
        """Pixels per code along each side: 2**(len(channel_multiplier)-1)."""
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def n_codes(self) -> int:
        """The codebook size the chosen quantizer actually has."""
        if self.quantizer == "fsq":
            n = 1
            for lv in self.fsq_levels:
                n *= lv
            return n
        return self.codebook_size


@dataclass
class ImageTrainConfig:
    """Training of the image tokenizer: losses, optimizer, data crops, logging and checkpoints."""

    model: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    """The tokenizer being trained."""
    steps: int = 2000
    """Optimizer steps in total (a resumed run continues up to this)."""
    batch_size: int = 16
    """Images (crops) per step."""
    lr: float = 1e-3
    """AdamW peak learning rate (linear warm-up, then cosine decay to lr/10)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    """AdamW betas (VQGAN's 0.5, 0.9)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    recon_loss: str = "l1"
    """Pixel reconstruction loss: 'l1' or 'l2'."""
    quantizer_loss_weight: float = 1.0
    """Weight of the quantizer's own loss (commitment / entropy terms)."""
    fsq_entropy_weight: float = 0.0
    """fsq: weight of MAGVIT-v2's entropy loss over FSQ's implicit codebook (0: plain FSQ, no
    auxiliary loss). On short CPU runs FSQ's channels come out correlated, so codes fill a thin
    slice of the level grid (8,5,5,5 on photos: 52% of codes used); the loss spreads them."""
    fsq_entropy_temperature: float = 0.1
    """fsq: temperature of the soft code assignment of that loss, in squared distance between
    bounded latents and codes (FSQ's [-1,1] units: neighbor levels of 5 are 0.5 apart)."""
    perceptual_weight: float = 0.0
    """Weight of the LPIPS/VGG perceptual loss; needs perceptual_weights (local files, nothing downloaded)."""
    perceptual_weights: list[str] = field(default_factory=list)
    """Local weight files (.safetensors or .pth): torchvision VGG16 'features.N.*' and optionally LPIPS 'linK.model.1.weight'."""
    disc_weight: float = 0.0
    """Weight of the patch-GAN generator loss (0: no discriminator)."""
    disc_start: int = 1000
    """Step at which the discriminator switches on (warm-up on reconstruction alone before)."""
    disc_channels: int = 32
    """Channels of the discriminator's first layer."""
    disc_layers: int = 3
    """Strided conv layers of the patch-GAN discriminator."""
    crop_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Random crops: side = image_size * s, s uniform in this range (1.0: native-resolution crops), resized to image_size."""
    hflip: bool = True
    """Randomly flip training crops horizontally."""
    min_image_side: int = 16
    """Images whose shorter side is below this are skipped as tiny (counted in the log)."""
    buffer_images: int = 512
    """Decoded images held in memory to draw crops from (datasets that fit are read once)."""
    eval_every: int = 250
    """Evaluate on the held-out crops every this many steps (0: only at the end)."""
    eval_crops_per_image: int = 16
    """Held-out crops per eval image (0: one whole image per file, by the resize/center-crop rule)."""
    eval_max_images: int = 2048
    """At most this many eval crops in all (eval_crops_per_image per image until the cap)."""
    log_every: int = 10
    """Write a metrics.jsonl row every this many steps."""
    save_every: int = 500
    """Checkpoint every this many steps (0: only at the end)."""
    tensorboard: bool = False
    """Also log the metrics.jsonl scalars to TensorBoard (OUT/tensorboard/), as the decoder's train.tensorboard."""
    seed: int = 0
    """Seed of initialization and crop sampling."""
    threads: int = 0
    """torch CPU threads while training (0: torch's default; 1 is fastest on a busy shared CPU)."""

    def __post_init__(self) -> None:
        self.betas = list(self.betas)
        self.crop_scale = list(self.crop_scale)
        self.perceptual_weights = list(self.perceptual_weights)
        check(self.steps >= 1, "steps", self.steps, ">= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(0 < self.lr <= 1, "lr", self.lr, "in (0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
              "two numbers in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0")
        check_choice(self.recon_loss, "recon_loss", ("l1", "l2"))
        check(self.quantizer_loss_weight >= 0, "quantizer_loss_weight", self.quantizer_loss_weight, ">= 0")
        check(self.fsq_entropy_weight >= 0, "fsq_entropy_weight", self.fsq_entropy_weight, ">= 0")
        check(self.fsq_entropy_temperature > 0, "fsq_entropy_temperature", self.fsq_entropy_temperature, "> 0")
        check(self.fsq_entropy_weight == 0 or self.model.quantizer == "fsq", "fsq_entropy_weight",
              self.fsq_entropy_weight, f"0 unless model.quantizer is 'fsq' (it is {self.model.quantizer!r})")
        check(self.perceptual_weight >= 0, "perceptual_weight", self.perceptual_weight, ">= 0")
        check(self.perceptual_weight == 0 or bool(self.perceptual_weights), "perceptual_weights",
              self.perceptual_weights, "local weight files when perceptual_weight > 0 (nothing is downloaded)")
        check(self.disc_weight >= 0, "disc_weight", self.disc_weight, ">= 0")
        check(self.disc_start >= 0, "disc_start", self.disc_start, ">= 0")
        check(self.disc_channels >= 1, "disc_channels", self.disc_channels, ">= 1")
        check(1 <= self.disc_layers <= 6, "disc_layers", self.disc_layers, "in [1, 6]")
        check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1], "crop_scale",
              self.crop_scale, "[min, max] with 0 < min <= max")
        check(self.min_image_side >= 1, "min_image_side", self.min_image_side, ">= 1")
        check(self.buffer_images >= 1, "buffer_images", self.buffer_images, ">= 1")
        for key in ("eval_every", "eval_crops_per_image", "log_every", "save_every", "threads"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        check(self.eval_max_images >= 1, "eval_max_images", self.eval_max_images, ">= 1")
        check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
