"""Optimizer and parameter groups from the recipe (shared by every backend).

Weight decay: each source names what it exempts (``optim.no_decay`` by parameter name,
``optim.no_decay_1d`` for every bias, norm weight and other 1-D tensor). Layer-wise learning-rate
decay (``optim.layer_decay``, fine-tuning) numbers the layers as mmpretrain's ``get_layer_depth``
and MAE/BEiT do: the embeddings (``patch_embed``, ``cls_token``, ``pos_embed``) 0, block i i + 1,
everything after the blocks (final norm, head) depth + 1 (timm puts the final norm with the last
block; otherwise its groups are these); a group's rate is ``lr x layer_decay ** (depth + 1 - layer)``, kept as its
``lr_scale`` and applied by :func:`set_lr`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..config import ConfigError, OptimConfig


def layer_decay_on(cfg: OptimConfig) -> bool:
    return cfg.layer_decay not in (0.0, 1.0)


def layer_id(name: str, depth: int) -> int:
    """The layer of a parameter for layer-wise lr decay (0 = embeddings, depth + 1 = after the blocks)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _decays(name: str, p: torch.Tensor, cfg: OptimConfig) -> bool:
    if any(name == n or name.endswith("." + n) for n in cfg.no_decay):
        return False
    return not (cfg.no_decay_1d and p.ndim <= 1)


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> List[Dict[str, Any]]:
    """Groups by weight decay (with / without) and, when ``optim.layer_decay`` is on, by layer."""
    if cfg.layer_decay < 0 or cfg.layer_decay > 1:
        raise ConfigError(f"optim.layer_decay {cfg.layer_decay} must be in (0, 1] (0 or 1 = off; timm and "
                          f"mmpretrain fine-tunes use 0.65-0.75)")
    depth = len(getattr(model, "blocks", []))
    by_key: Dict[Tuple[int, bool], List[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_id(name, depth) if layer_decay_on(cfg) else depth + 1
        by_key.setdefault((layer, _decays(name, p, cfg)), []).append(p)
    groups = []
    for (layer, decays), params in sorted(by_key.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        g: Dict[str, Any] = {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0}
        if layer_decay_on(cfg):
            g["lr_scale"] = cfg.layer_decay ** (depth + 1 - layer)
        groups.append(g)
    return groups


def optimizer_kwargs(cfg: OptimConfig) -> Dict[str, Any]:
    if cfg.name == "sgd":
        return dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    cls = torch.optim.SGD if cfg.name == "sgd" else torch.optim.AdamW
    opt = cls(param_groups(model, cfg), **optimizer_kwargs(cfg))
    set_lr(opt, cfg.lr)
    return opt


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate: ``lr`` times the group's ``lr_scale`` (layer-wise decay) when it has one."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def check_optim_backend(cfg: OptimConfig, backend_name: str) -> None:
    """Refuse, in one line, what a backend cannot do with the recipe's optimizer settings (nothing today:
    the ipu backend pushes each group's scaled rate with setOptimizer)."""
