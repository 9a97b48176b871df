"""`omni eval`: the settings of the evaluation suites (``key=value`` on the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import check, check_choice
from omni.config.model import RopeConfig


@dataclass
class ImageEvalConfig:
    """The image-tokenizer suite: PSNR, SSIM, codebook usage and speed on a fixed set of images."""

    crops_per_image: int = 16
    """Native-resolution random crops per image (seeded); 0: each whole image, resized and
    center-cropped by the tokenizer's rule."""
    max_images: int = 2048
    """At most this many evaluation images (crops count one each)."""
    seed: int = 0
    """Seed of the crops."""
    batch_size: int = 64
    """Images encoded and decoded at once."""

    def __post_init__(self) -> None:
        check(self.crops_per_image >= 0, "crops_per_image", self.crops_per_image, ">= 0")
        check(self.max_images >= 1, "max_images", self.max_images, ">= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


@dataclass
class AudioEvalConfig:
    """The audio-tokenizer suite: mel L1, codebook usage, envelope correlation, real-time factors."""

    max_clips: int = 200
    """Evaluate at most this many clips."""
    threads: int = 2
    """torch CPU threads while evaluating (the real-time factors depend on it)."""

    def __post_init__(self) -> None:
        check(self.max_clips >= 1, "max_clips", self.max_clips, ">= 1")
        check(1 <= self.threads <= 256, "threads", self.threads, "in [1, 256]")


@dataclass
class DemoEvalConfig:
    """The demo suite (`omni eval demo`): generations on one split of the toy world, judged."""

    split: str = "validation"
    """Scenes measured: 'validation' (with 'compositional_validation'), where a recipe is tuned, or
    'test' (with 'compositional_test'), reported once; `omni demo` itself reports 'test'."""

    def __post_init__(self) -> None:
        check_choice(self.split, "split", ("validation", "test"))


@dataclass
class DetectionEvalConfig:
    """The detection suite (`omni eval detection`): COCO AP of the <det> head on toy-world scenes."""

    split: str = "validation"
    """Scenes measured: 'validation', where a recipe is tuned, or 'test', reported once (both disjoint
    from 'train' by content)."""
    n_scenes: int = 300
    """Scenes; each gets three requests: "find the shapes", a pair it shows, a pair it lacks."""
    seed: int = 0
    """Seed of the scenes and of the requests' pairs."""
    grid: int = 1
    """Objects on a grid of this many pixels, as the training scenes were drawn (the demo's: 4)."""
    batch_size: int = 32
    """Requests per forward."""

    def __post_init__(self) -> None:
        check_choice(self.split, "split", ("validation", "test"))
        check(self.n_scenes >= 1, "n_scenes", self.n_scenes, ">= 1")
        check(self.grid >= 1, "grid", self.grid, ">= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


@dataclass
class GenHeadEvalConfig:
    """The gen-head suite (`omni eval gen-head`): images the <gen> head makes for held-out captions, judged."""

    judge: str = ""
    """A trained toy-world judge's folder (an `omni demo` folder's judge/); required."""
    split: str = "validation"
    """Scenes measured: 'validation' (tune here) or 'test' (report once); both disjoint from 'train'."""
    n_scenes: int = 120
    """Captions to draw (a caption per scene; one to three objects each)."""
    grid: int = 1
    """Objects on a grid of this many pixels, as the training scenes were drawn (the demo's: 4)."""
    order: str = "left_to_right"
    """The order captions name objects in, as in training (the demo's: 'reading')."""
    guidance: float = 1.0
    """Classifier-free guidance scale of the head's sampler (1: conditional only)."""
    steps: int = 20
    """Sampler steps per image."""
    seed: int = 0
    """Seed of the scenes and of the sampler's noise."""

    def __post_init__(self) -> None:
        check_choice(self.split, "split", ("validation", "test"))
        check_choice(self.order, "order", ("left_to_right", "reading"))
        check(self.n_scenes >= 1, "n_scenes", self.n_scenes, ">= 1")
        check(self.grid >= 1, "grid", self.grid, ">= 1")
        check(self.guidance >= 0, "guidance", self.guidance, ">= 0")
        check(self.steps >= 1, "steps", self.steps, ">= 1")


@dataclass
class NiahEvalConfig:
    """The needle-in-a-haystack suite (`omni eval niah`): exact-match retrieval over length x depth."""

    kind: str = "text"
    """'text' (a magic number hidden in real text) or 'vision' (V-NIAH: an odd picture among haystack pictures)."""
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    """Context lengths in tokens (V-NIAH: as many whole pictures as fit)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle depths: the share of the haystack before the needle, each in [0, 1]."""
    items: int = 20
    """Items per (length, depth) cell."""
    split: str = "validation"
    """Haystack text, magic numbers and pictures of this split: 'validation' (tune here) or 'test'
    (report once); both disjoint from 'train' by content."""
    seed: int = 0
    """Seed of the items."""
    grid: int = 1
    """V-NIAH: objects on a grid of this many pixels, as the training scenes were drawn (the demo's: 4)."""
    batch_size: int = 4
    """Items per forward."""
    rope: RopeConfig | None = None
    """The position encoding to evaluate with (niah.rope.kind=yarn niah.rope.factor=4 ...); null: the checkpoint's own."""
    extrapolate: bool = False
    """Allow lengths beyond what the position encoding covers (to measure plain extrapolation)."""

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", ("text", "vision"))
        check(len(self.lengths) >= 1 and all(n >= 1 for n in self.lengths), "lengths", self.lengths,
              "a non-empty list of token counts >= 1")
        check(len(self.depths) >= 1 and all(0.0 <= d <= 1.0 for d in self.depths), "depths", self.depths,
              "a non-empty list of depths in [0, 1]")
        check(self.items >= 1, "items", self.items, ">= 1")
        check_choice(self.split, "split", ("validation", "test"))
        check(self.grid >= 1, "grid", self.grid, ">= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


@dataclass
class LongwriteEvalConfig:
    """The long-output suite (`omni eval longwrite`): toy-world stories of N steps, scored by length and quality
    (LongWriter-V, arXiv 2502.14834)."""

    judge: str = ""
    """A trained toy-world judge's folder (an `omni demo` folder's judge/); required."""
    split: str = "validation"
    """Stories measured: 'validation' (tune here) or 'test' (report once); prompt text and pictures are
    both disjoint from 'train' by content (omni.toy.stories)."""
    steps: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    """Story lengths N asked for (one bucket each); pretraining stories have 1 to 3 steps."""
    prompts: int = 10
    """Story prompts per length N."""
    seed: int = 0
    """Seed of the stories (each bucket walks the same scene stream) and of the sampler."""
    grid: int = 4
    """Objects on a grid of this many pixels, as the training scenes were drawn (the demo's: 4)."""
    order: str = "reading"
    """The order a scene's objects become steps, as in training (the demo's: 'reading')."""
    batch_size: int = 8
    """Prompts generated at once (a batch's prompts are padded to its longest, which takes positions)."""
    show: int = 2
    """Stories per bucket shown on index.html with their pictures."""

    def __post_init__(self) -> None:
        check_choice(self.split, "split", ("validation", "test"))
        check_choice(self.order, "order", ("left_to_right", "reading"))
        check(len(self.steps) >= 1 and all(isinstance(n, int) and n >= 1 for n in self.steps), "steps", self.steps,
              "a non-empty list of story lengths >= 1")
        check(self.prompts >= 1, "prompts", self.prompts, ">= 1")
        check(self.grid >= 1, "grid", self.grid, ">= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.show >= 0, "show", self.show, ">= 0")


@dataclass
class EvalConfig:
    """Settings of every suite of `omni eval` (omni.eval.SUITES); each suite reads its own section."""

    image: ImageEvalConfig = field(default_factory=ImageEvalConfig)
    """The image-tokenizer suite."""
    audio: AudioEvalConfig = field(default_factory=AudioEvalConfig)
    """The audio-tokenizer suite."""
    demo: DemoEvalConfig = field(default_factory=DemoEvalConfig)
    """The demo suite."""
    detection: DetectionEvalConfig = field(default_factory=DetectionEvalConfig)
    """The detection suite."""
    gen: GenHeadEvalConfig = field(default_factory=GenHeadEvalConfig)
    """The gen-head suite."""
    niah: NiahEvalConfig = field(default_factory=NiahEvalConfig)
    """The needle-in-a-haystack suite."""
    longwrite: LongwriteEvalConfig = field(default_factory=LongwriteEvalConfig)
    """The long-output suite."""
