"""The tiny image tokenizer the distributed tokenizer tests train (test_image_tokenizer.py's size:
32 px -> 4x4 codes of 64), as `omni tokenizer train image` overrides."""

from __future__ import annotations

import json

IMAGE_TINY = dict(image_size=32, base_channels=8, channel_multiplier=[1, 2, 2, 2], norm_groups=4,
                  latent_channels=16, embed_dim=8, codebook_size=64, fsq_levels=[4, 4, 4])


def image_overrides() -> list[str]:
    """The model above, a batch of 4, a log row every step, no periodic save or eval, a 2-image final eval."""
    return [*[f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in IMAGE_TINY.items()],
            "batch_size=4", "log_every=1", "save_every=0", "eval_every=0", "eval_max_images=2",
            "eval_crops_per_image=1"]
