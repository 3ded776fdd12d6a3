"""Learning-rate schedules, each computed as its source computes it, chosen by ``schedule.kind``.

A schedule maps the optimizer step (0-based, the step about to run) to a learning rate.
Lengths are given in optimizer steps (``total_steps``, ``warmup_steps``), in epochs
(``epochs``, ``warmup_epochs``) or as a fraction of the run (``warmup_fraction``); epochs
resolve to steps with ``steps per epoch = ceil(train samples / global batch)``, the length
of an epoch in mmengine (no ``drop_last``) and in ClassyVision (one optimizer step per
global batch) alike.

    cosine                  ours: linear warm-up from ``warmup_start_factor x lr`` to lr, then a
                            cosine from lr to ``min_lr`` over the remaining steps (restarts at the peak)
    constant                ours: linear warm-up, then lr
    mmcv_cosine             mmcv 1.x ``CosineAnnealingLrUpdaterHook(min_lr, warmup='linear',
                            warmup_ratio)`` by iteration: ``annealing_cos(lr, min_lr, step / total)``
                            over every step, warm-up included, multiplied during warm-up by
                            ``1 - (1 - step / W) (1 - warmup_ratio)``; the cosine never restarts
    mmengine_linear_cosine  mmengine ``LinearLR(start_factor, end=warmup_epochs,
                            convert_to_iter_based=True)`` then ``CosineAnnealingLR(eta_min=min_lr,
                            begin=warmup_epochs, by_epoch=True)`` to the last epoch. mmengine chains
                            them recursively (each value from the previous one); both recursions
                            telescope to the closed forms used here
    classy_composite        ClassyVision ``composite`` (fvcore), ``update_interval: step``,
                            ``where = step / total``: for ``where + 1e-6 <= warmup_fraction`` the
                            linear ``start -> lr`` rescaled to its own 0..1 ("rescaled"), after it
                            the cosine ``lr -> min_lr`` at the overall ``where`` ("fixed")
    classy_cosine           ClassyVision ``cosine`` ``lr -> min_lr`` at ``where = step / total``

ClassyVision evaluates ``where`` at the last forward pass of each gradient-accumulation
period, counting forward passes; with one forward pass per optimizer step (no accumulation)
that is ``step / total``, which is what is computed here whatever our accumulation is.

tests/test_schedule_sources.py runs each source's own code (mmcv's IterBasedRunner and LR hook,
mmengine's Runner with its ParamSchedulerHook, ClassyVision's ClassificationTask) over whole runs
of every recipe and compares every step with these formulas.

Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from ..config import ScheduleConfig, check_schedule, is_whole
from ..errors import ConfigError

# fvcore's ParamScheduler.WHERE_EPSILON: the composite scheduler switches when where + eps > boundary
WHERE_EPSILON = 1e-6


def needs_train_samples(cfg: ScheduleConfig) -> bool:
    """Whether resolving the schedule needs the training set's size (lengths in epochs)."""
    return cfg.epochs > 0 or cfg.warmup_epochs > 0


def steps_per_epoch(train_samples: int, global_batch: int) -> int:
    """Optimizer steps in one epoch: ceil(samples / global batch) (the last batch may be short)."""
    return -(-train_samples // global_batch)


# ---------------------------------------------------------------------------------------
# The resolved schedule
# ---------------------------------------------------------------------------------------

@dataclass
class Schedule:
    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int                 # steps at a warm-up rate (classy_composite: before the switch)
    warmup_start_factor: float
    min_lr: float
    steps_per_epoch: int = 0          # 0 when every length was given in steps
    train_samples: int = 0
    global_batch_size: int = 0
    epochs: float = 0.0
    warmup_epochs: float = 0.0
    warmup_fraction: float = 0.0

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        return _FORMULAS[self.kind](self, step)

    def lrs(self) -> List[float]:
        return [self.lr(s) for s in range(self.total_steps)]

    def describe(self) -> str:
        text = f"{self.kind}: {self.total_steps:,} optimizer steps"
        if self.steps_per_epoch:
            text += (f" ({self.epochs:g} epochs x {self.steps_per_epoch:,} steps; steps per epoch = ceil("
                     f"{self.train_samples:,} samples / global batch {self.global_batch_size:,}))")
        return text + f", warm-up {self.warmup_steps:,} steps, lr {self.base_lr:g} (min {self.min_lr:g})"


def _cosine(s: Schedule, step: int) -> float:
    w = s.warmup_steps
    if w > 0 and step < w:
        return s.base_lr * (s.warmup_start_factor + (1.0 - s.warmup_start_factor) * step / w)
    if s.kind == "constant":
        return s.base_lr
    progress = min(max(step - w, 0) / max(s.total_steps - w, 1), 1.0)
    return s.min_lr + (s.base_lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _mmcv_cosine(s: Schedule, step: int) -> float:
    regular = s.min_lr + 0.5 * (s.base_lr - s.min_lr) * (math.cos(math.pi * step / s.total_steps) + 1)
    if s.warmup_steps > 0 and step < s.warmup_steps:
        k = (1 - step / s.warmup_steps) * (1 - s.warmup_start_factor)
        return regular * (1 - k)
    return regular


def _mmengine_linear_cosine(s: Schedule, step: int) -> float:
    w = s.warmup_steps                              # int(warmup_epochs x steps per epoch)
    span = w - 1                                    # LinearLR.total_iters = end - begin - 1
    if step < w:
        if span <= 0:
            return s.base_lr * s.warmup_start_factor
        return s.base_lr * (s.warmup_start_factor + (1.0 - s.warmup_start_factor) * step / span)
    # CosineAnnealingLR from the value LinearLR left (lr, or start_factor x lr for a 1-step warm-up)
    start = s.base_lr if span > 0 else s.base_lr * s.warmup_start_factor
    k = step // s.steps_per_epoch - int(round(s.warmup_epochs))
    t_max = int(round(s.epochs)) - int(round(s.warmup_epochs))
    return s.min_lr + (start - s.min_lr) * (1 + math.cos(math.pi * k / t_max)) / 2


def _classy_composite(s: Schedule, step: int) -> float:
    where = step / s.total_steps
    if not where + WHERE_EPSILON > s.warmup_fraction:
        w = where / s.warmup_fraction               # "rescaled"
        return s.base_lr * w + s.base_lr * s.warmup_start_factor * (1 - w)
    return _classy_cosine(s, step)                  # "fixed": the overall where


def _classy_cosine(s: Schedule, step: int) -> float:
    where = step / s.total_steps
    return s.min_lr + 0.5 * (s.base_lr - s.min_lr) * (1 + math.cos(math.pi * where))


_FORMULAS = {"cosine": _cosine, "constant": _cosine, "mmcv_cosine": _mmcv_cosine,
             "mmengine_linear_cosine": _mmengine_linear_cosine, "classy_composite": _classy_composite,
             "classy_cosine": _classy_cosine}


def build_schedule(cfg: ScheduleConfig, base_lr: float, global_batch: int,
                   train_samples: Optional[int] = None) -> Schedule:
    """Resolve the recipe's lengths to optimizer steps; errors show the arithmetic."""
    check_schedule(cfg)
    spe = 0
    if needs_train_samples(cfg):
        if not train_samples:
            raise ConfigError("schedule: lengths in epochs need the number of training samples (from the training "
                              "shards' manifest, or `vit-accel plan --train-samples N`; ImageNet-1k has 1,281,167)")
        spe = steps_per_epoch(train_samples, global_batch)
    per_epoch = (f"steps per epoch = ceil(train samples {train_samples:,} / global batch {global_batch:,}) = {spe:,}"
                 if spe else "")
    if cfg.epochs > 0:
        total = int(round(cfg.epochs * spe)) if is_whole(cfg.epochs * spe) else int(math.ceil(cfg.epochs * spe))
        total_text = f"epochs {cfg.epochs:g} x {spe:,} = {total:,} steps"
    else:
        total = cfg.total_steps
        total_text = f"total_steps {total:,}"
    if total <= 0:
        raise ConfigError(f"schedule: the run has no optimizer step ({total_text}; {per_epoch})")
    if cfg.warmup_epochs > 0:
        warm = int(cfg.warmup_epochs * spe)         # mmengine's convert_to_iter_based: int(end x epoch length)
        warm_text = f"warmup_epochs {cfg.warmup_epochs:g} x {spe:,} = {warm:,} steps"
    elif cfg.warmup_fraction > 0:
        if cfg.kind == "classy_composite":          # the steps whose where falls in the first phase
            warm = sum(1 for k in range(total) if not k / total + WHERE_EPSILON > cfg.warmup_fraction)
        else:
            warm = int(cfg.warmup_fraction * total)
        warm_text = f"warmup_fraction {cfg.warmup_fraction:g} of {total:,} = {warm:,} steps"
    else:
        warm = cfg.warmup_steps
        warm_text = f"warmup_steps {warm:,}"
    if warm >= total:
        raise ConfigError(f"schedule: the warm-up ({warm_text}) does not fit in the run ({total_text})"
                          + (f"; {per_epoch}" if per_epoch else ""))
    if cfg.kind == "mmengine_linear_cosine" and cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"schedule: CosineAnnealingLR would begin at epoch {cfg.warmup_epochs:g}, after the last "
                          f"epoch {cfg.epochs:g}")
    return Schedule(kind=cfg.kind, base_lr=base_lr, total_steps=total, warmup_steps=warm,
                    warmup_start_factor=cfg.warmup_start_factor, min_lr=cfg.min_lr, steps_per_epoch=spe,
                    train_samples=train_samples or 0, global_batch_size=global_batch, epochs=cfg.epochs,
                    warmup_epochs=cfg.warmup_epochs, warmup_fraction=cfg.warmup_fraction)


def lr_at(step: int, cfg: ScheduleConfig, base_lr: float, train_samples: Optional[int] = None,
          global_batch: int = 1) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a schedule section."""
    return build_schedule(cfg, base_lr, global_batch, train_samples).lr(step)
