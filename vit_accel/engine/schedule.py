"""Per-iteration learning-rate schedule: linear warm-up from a fraction of lr, then cosine."""
from __future__ import annotations

import math

from ..config import ScheduleConfig


def lr_at(step: int, cfg: ScheduleConfig, base_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warm-up goes linearly from ``warmup_start_factor x lr`` at step 0 to ``lr`` at step
    ``warmup_steps``; then cosine (or constant) to ``min_lr`` at ``total_steps``.
    """
    w, total = cfg.warmup_steps, cfg.total_steps
    if w > 0 and step < w:
        f = cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / w
        return base_lr * f
    if cfg.kind == "constant":
        return base_lr
    progress = min(max(step - w, 0) / max(total - w, 1), 1.0)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
