"""The training loss of every backend (CPU/GPU step loop, DeepSpeed ZeRO, PopTorch), written once.

``training_loss(logits, target, label_smoothing)``: the mean over samples of
``-sum(target x log_softmax(logits))``. Class indices become one-hot targets smoothed as
``(1 - s) one_hot + s / classes`` (torch's, timm's and mmpretrain's label smoothing); soft targets
(mixup/cutmix) are used as they come, they carry their smoothing already. So it is
``F.cross_entropy(logits, y, label_smoothing=s)`` for indices and timm's / ClassyVision's
``SoftTargetCrossEntropy`` for soft targets, whichever ``optim.loss`` names the source's loss.

Two choices serve the IPU, where this runs inside the PopTorch graph: the one-hot comes from a
comparison with ``arange`` rather than an index op (PopTorch feeds int64 labels as int32, which
comparisons accept on every device), and the log-softmax is taken in fp32 (in fp16 a 1,000-way
log-softmax loses the small probabilities).

Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def training_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [B, C] against class indices [B] or soft targets [B, C]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if target.is_floating_point():
        soft = target.float()
    else:
        classes = logits.shape[-1]
        soft = (target.unsqueeze(1) == torch.arange(classes, device=target.device)).float()
        if label_smoothing:
            soft = soft * (1.0 - label_smoothing) + label_smoothing / classes
    return -(soft * logp).sum(dim=-1).mean()
