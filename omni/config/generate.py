"""Generation config: sampling per modality, classifier-free guidance, stopping, prompt handling."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import check, check_choice


@dataclass
class SamplingConfig:
    """How the next token of one modality is drawn."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1.0: no limit)."""

    def __post_init__(self) -> None:
        check(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        check(self.top_k >= 0, "top_k", self.top_k, ">= 0")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")


@dataclass
class GenerateConfig:
    """`omni generate` / `omni.generate`: what to sample and when to stop."""

    max_new_tokens: int = 256
    """Stop after this many new tokens (an open image block is never started when it cannot finish)."""
    max_images: int = 4
    """Stop a sequence after it has generated this many images (once min_audio is met)."""
    min_images: int = 0
    """Make at least this many images (1 for caption-to-image): no <eos> before them, and no text or
    audio that would leave too few new tokens for them (each takes <boi> + N codes + <eoi>);
    max_new_tokens must hold them, or generation refuses to start."""
    min_audio: int = 0
    """Make at least this many audio blocks (1 for text-to-speech): no <eos> before them, and no text
    or image that would leave too few new tokens for them (each takes at least <boa> + 1 code + <eoa>,
    so an audio block is closed early when the budget requires it); max_new_tokens must hold them."""
    max_audio_tokens: int = 250
    """Longest audio block in codes (10 s at 25 Hz)."""
    text: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.9))
    """Sampling of text tokens (and specials)."""
    image: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_k=2000))
    """Sampling of image codes (Lumina-mGPT and Emu3 use a large top-k)."""
    audio: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.9, top_k=200))
    """Sampling of audio codes."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale inside image blocks (1.0: no guidance)."""
    audio_cfg_scale: float = 1.0
    """Classifier-free guidance scale inside audio blocks (1.0: no guidance)."""
    allow_text: bool = True
    """Allow text tokens in text mode (False: only start media blocks or stop)."""
    allow_images: bool = True
    """Allow <boi> (starting an image)."""
    allow_audio: bool = True
    """Allow <boa> (starting an audio block)."""
    prompt_overflow: str = "error"
    """A prompt longer than the context: 'error', or 'truncate' (keep its last tokens)."""
    rerank: int = 1
    """Best of N: sample this many candidates per prompt and keep the one whose images and audio
    best explain the prompt's text, by the model's own log p(prompt text | generated media) (DALL-E's
    reranking, with the model itself as the scorer: it learns both directions of every pair).
    1: no reranking. Costs N times the sampling plus one scoring pass."""
    jacobi: int = 0
    """Speculative Jacobi decoding inside image blocks (Teng et al. 2024, as Lumina-mGPT): feed
    this many guessed codes with each forward pass and keep those the model accepts, so a pass can
    yield several codes. Exactly greedy decoding's output at temperature 0 (up to float rounding of
    a batched forward), the same distribution when sampling. 0: one token per pass. Pays off for
    one prompt at a time (bench/jacobi.py on the demo model: 4.6 codes per pass, 2.5-3.6x faster);
    a batch advances by its shortest accepted run, so large sampled batches are slower with it."""
    compile: bool = False
    """Run the decode steps through ``torch.compile`` (inductor, dynamic shapes; the prefill stays
    eager). Fuses the norms, RoPE and the cache's mask into a few kernels and cuts the per-token
    Python overhead, which is a third of a small model's eager step on a CPU; the same tokens up
    to float rounding. The first call compiles (about a minute on a CPU, once per process and
    model); worth it for long outputs (bench/generate.py)."""
    seed: int = 0
    """Seed of the sampler: the same seed and inputs give the same output."""
    det_threshold: float = 0.5
    """A model with a detection head (``model.heads``): the score a box needs to be kept when the model
    emits ``<det>`` (the head's object probability, 0..1)."""

    gen_guidance: float = 1.0
    """A model with a diffusion head: its classifier-free guidance scale when the model emits ``<gen>``
    (1: conditional only; > 1 pushes the sample toward the condition)."""
    gen_steps: int = 20
    """A model with a diffusion head: its sampler steps per image."""

    def __post_init__(self) -> None:
        check(0.0 <= self.det_threshold <= 1.0, "det_threshold", self.det_threshold, "in [0, 1]")
        check(self.gen_guidance >= 0.0, "gen_guidance", self.gen_guidance, ">= 0")
        check(self.gen_steps >= 1, "gen_steps", self.gen_steps, ">= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        check(self.max_images >= 0, "max_images", self.max_images, ">= 0")
        check(0 <= self.min_images <= max(self.max_images, 0), "min_images", self.min_images,
              f"in [0, max_images={self.max_images}]")
        check(self.min_audio >= 0, "min_audio", self.min_audio, ">= 0")
        check(self.max_audio_tokens >= 1, "max_audio_tokens", self.max_audio_tokens, ">= 1")
        check(self.cfg_scale >= 0, "cfg_scale", self.cfg_scale, ">= 0")
        check(self.audio_cfg_scale >= 0, "audio_cfg_scale", self.audio_cfg_scale, ">= 0")
        check(self.jacobi >= 0, "jacobi", self.jacobi, ">= 0 (0: off)")
        check(self.rerank >= 1, "rerank", self.rerank, ">= 1 (1: no reranking)")
        check_choice(self.prompt_overflow, "prompt_overflow", ("error", "truncate"))
