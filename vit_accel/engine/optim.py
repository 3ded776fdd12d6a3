"""Optimizer and parameter groups from the recipe (shared by every backend)."""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from ..config import OptimConfig


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> List[Dict[str, Any]]:
    """Two groups: with weight decay, and without (names in ``no_decay``; 1-D tensors if asked)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = any(name == n or name.endswith("." + n) for n in cfg.no_decay)
        if cfg.no_decay_1d and p.ndim <= 1:
            skip = True
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def optimizer_kwargs(cfg: OptimConfig) -> Dict[str, Any]:
    if cfg.name == "sgd":
        return dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    cls = torch.optim.SGD if cfg.name == "sgd" else torch.optim.AdamW
    return cls(param_groups(model, cfg), **optimizer_kwargs(cfg))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
