"""`omni demo`: the toy world it trains on and how it measures the result (``demo.*`` of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import check, check_choice
from omni.toy.shapes import ORDERS


@dataclass
class DemoConfig:
    """Sizes of the toy world (omni.toy.shapes) that `omni demo` makes, trains on and evaluates on."""

    canvas: int = 32
    """Scene side in pixels; must equal tokenizer.image.model.image_size (32: 8x8 codes at 4x downsampling)."""
    grid: int = 4
    """Object sides and positions are multiples of this many pixels: with the image tokenizer's
    patch size (4 at 4x downsampling) every object is one fixed pattern of whole patches, which a
    model trained for minutes can learn to draw (1: any pixel)."""
    order: str = "reading"
    """Order objects are named in by captions, speech and stories (omni.toy.shapes.ORDERS):
    'reading' (top edge, then left edge) is the order the model draws them in, row by row of image
    codes, so the caption says which object comes next; 'left_to_right' by box center."""
    caption_scenes: int = 4000
    """Training scenes written as image-caption pairs (both orders: captioning and caption-to-image)."""
    speech_scenes: int = 1500
    """Training scenes written as spoken-caption pairs (wav + transcript: speech-to-text and text-to-speech)."""
    story_scenes: int = 1000
    """Training scenes written as stories: "draw a red circle, then a blue square." + one image per object."""
    caption_weight: float = 0.6
    """Blend weight of the caption documents in pretraining."""
    speech_weight: float = 0.25
    """Blend weight of the speech documents in pretraining."""
    story_weight: float = 0.15
    """Blend weight of the story documents in pretraining."""
    image_rerank: int = 1
    """Caption to image: candidates sampled per caption; the one the model itself reads back as the
    caption best is kept (GenerateConfig.rerank). metrics.json also keeps the first candidate's score."""
    judge_scenes: int = 600
    """Scenes the image judge (omni.eval.judge) is trained on; it reads generated images."""
    eval_scenes: int = 100
    """Held-out scenes each task is measured on (never seen in training)."""
    stories: list[str] = field(default_factory=lambda: [
        "draw a red circle, then a blue square.",
        "draw a yellow triangle, then a green circle.",
        "draw an orange square, then a purple triangle, then a blue circle.",
    ])
    """Story prompts generated and measured (each "draw A, then B" step must yield an image of it)."""
    show: int = 4
    """Examples per task shown on index.html."""

    def __post_init__(self) -> None:
        check(self.canvas >= 32, "canvas", self.canvas, ">= 32 (three shapes must fit)")
        for name in ("caption_scenes", "speech_scenes", "story_scenes", "judge_scenes", "eval_scenes"):
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("caption_weight", "speech_weight", "story_weight"):
            check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        check(self.caption_weight + self.speech_weight + self.story_weight > 0, "caption_weight",
              self.caption_weight, "a positive sum of caption_weight, speech_weight and story_weight")
        check(self.show >= 0, "show", self.show, ">= 0")
        check_choice(self.order, "order", ORDERS)
        check(self.image_rerank >= 1, "image_rerank", self.image_rerank, ">= 1 (1: no reranking)")
