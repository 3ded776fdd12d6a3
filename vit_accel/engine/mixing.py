"""Mixup / CutMix of each micro-batch on its own, as the sources mix.

timm, mmpretrain (``RandomBatchAugment`` in its data preprocessor) and ClassyVision
(``MixupTransform`` in ``train_step``) mix the batch that one device's loader hands to one forward
pass: with gradient accumulation each forward pass's batch on its own (ClassyVision: 64 per
replica inside a simulated 4,096). One call of our backends holds many of them: micro-batch x
accumulation, and on IPUs x local replicas x device iterations, laid out as PopART reads it,
``[device iteration, accumulation, replica, micro-batch]``. Each micro-batch is mixed alone
(``data.BatchMix``: its own mixup-or-cutmix draw and lambda, its partners the reversed
micro-batch), from a seed of (seed, rank, optimizer step, micro-batch of the step), so a resumed
run mixes exactly as an uninterrupted one, whatever the backend.

Python 3.8 / torch 2.0 compatible (the trainer runs it for the IPU path too).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch

from ..config import ConfigError


def micro_batch_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """A 63-bit seed from (seed, rank, step, micro-batch): numpy's SeedSequence hash, no collisions of note."""
    words = np.random.SeedSequence([seed % 2 ** 64, rank, step, micro_batch]).generate_state(2)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)


class MicroBatchMix:
    """Mix every micro-batch of a call's batch alone: ``(uint8 images, labels, first step) -> float32 images,
    soft targets``. ``micro_batches_per_step`` micro-batches make one optimizer step; a call may hold several
    steps (IPU device iterations), the k-th micro-batch belonging to step ``first + k // micro_batches_per_step``."""

    def __init__(self, mix: Any, micro_batch_size: int, micro_batches_per_step: int, seed: int, rank: int):
        self.mix, self.micro, self.per_step = mix, micro_batch_size, micro_batches_per_step
        self.seed, self.rank = seed, rank

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        b, mb = images.shape[0], self.micro
        if b % mb:
            raise ValueError(f"mixup/cutmix got {b} images, not a whole number of micro-batches of {mb}")
        xs, ys = [], []
        for k in range(b // mb):
            extra_steps, index = divmod(k, self.per_step)
            x, y = self.mix(images[k * mb:(k + 1) * mb], labels[k * mb:(k + 1) * mb],
                            micro_batch_seed(self.seed, self.rank, step + extra_steps, index))
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)


def micro_batch_mix(recipe: Any, backend: Any, rank: int) -> Optional[MicroBatchMix]:
    """The recipe's Mixup / CutMix over ``backend``'s micro-batches, or None when it asks for neither."""
    d = recipe.data
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    micro = backend.micro_batch_size
    if micro % 2:
        raise ConfigError(f"data.mixup {d.mixup:g} / data.cutmix {d.cutmix:g} pair each image of a micro-batch with "
                          f"the reversed micro-batch (as timm and the sources do), so the micro-batch must be even; "
                          f"the {backend.name} backend runs micro-batches of {micro}: set an even "
                          f"{backend.name}.micro_batch_size (on CPUs and GPUs it must divide each process's share "
                          f"of train.global_batch_size {recipe.train.global_batch_size})")
    from ..data import BatchMix

    per_step = backend.batch_per_call // backend.steps_per_call // micro
    mix = BatchMix(recipe.model.num_classes, d.mixup, d.cutmix, d.mix_prob, d.mix_switch_prob,
                   recipe.optim.label_smoothing, batch_size=micro)
    return MicroBatchMix(mix, micro, per_step, recipe.train.seed, rank)
