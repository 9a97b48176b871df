"""Learning-rate schedules: linear warmup, then cosine, WSD or constant.

Cosine: Loshchilov & Hutter, "SGDR" (2017). WSD (warmup-stable-decay): Hu et al., "MiniCPM"
(2024), Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations" (2024). A pure function of the step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math

from omni.config.train import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps  # reaches lr at the last warmup step
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))
    # wsd: stable at lr, then linear decay to min_lr over the last decay_fraction of the steps
    decay_steps = max(1, round(cfg.steps * cfg.decay_fraction))
    start = cfg.steps - decay_steps
    if step < start:
        return cfg.lr
    t = min(1.0, (step - start + 1) / decay_steps)
    return cfg.lr + (cfg.min_lr - cfg.lr) * t
