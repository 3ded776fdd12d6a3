"""Model EMA with mmengine's semantics (mmpretrain's ``EMAHook`` + ``ExponentialMovingAverage``).

After every optimizer step: the first update copies the weights, each later one moves the
average toward them, ``ema = (1 - momentum) x ema + momentum x w`` (``lerp_``; mmpretrain's ViT
recipe: momentum 1e-4). The EMA is kept in fp32 beside the model on its device, evaluated beside
the raw weights by swapping it into the model (as ``EMAHook`` does for validation) and saved in
every checkpoint under ``ema`` (momentum, updates so far, fp32 weights with timm keys), so a
resumed run continues the same average.

Where the full weights are not on the host process after each step the EMA is refused in one
line: on IPUs (one call runs several optimizer steps with the weights on the device) and under
DeepSpeed ZeRO-3 (each process holds a shard). ZeRO 0-2 keep full working weights on every
process; under bf16 those are the bf16 copies, which the fp32 average absorbs.

Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Dict, Iterator

import torch

from ..config import ConfigError


def check_ema_backend(recipe: Any, backend_name: str) -> None:
    """One-line refusal where the EMA cannot see the full weights after each step."""
    m = recipe.train.ema_momentum
    if not 0 <= m < 1:
        raise ConfigError(f"train.ema_momentum {m} must be in [0, 1) (mmengine's momentum: 1e-4 keeps 0.9999 of "
                          f"the average each step; 0 = off)")
    if m and backend_name == "ipu":
        raise ConfigError("train.ema_momentum on the ipu backend: the weights stay on the IPUs across the "
                          "ipu.device_iterations steps of a call; train with --backend cpu or gpu, or set "
                          "train.ema_momentum=0")
    if m and backend_name in ("cpu", "gpu") and recipe.distributed.zero_stage == 3:
        raise ConfigError("train.ema_momentum under distributed.zero_stage 3: each process holds only a shard of "
                          "the weights; use zero_stage 0, 1 or 2 (full weights on every process), or set "
                          "train.ema_momentum=0")


def ema_parameters(backend: Any) -> "OrderedDict[str, torch.Tensor]":
    """The trained weights the EMA follows (under ZeRO 0-2 the DeepSpeed engine trains this same module)."""
    from ..model import unwrap

    module = unwrap(backend.model)
    return OrderedDict((n, p) for n, p in module.named_parameters())


class ModelEMA:
    """fp32 exponential moving average of named parameters."""

    def __init__(self, momentum: float, params: Dict[str, torch.Tensor]):
        self.momentum = momentum
        self.steps = 0                      # updates so far (mmengine's ``steps`` buffer)
        self.params = OrderedDict((n, p.detach().float().clone()) for n, p in params.items())

    @torch.no_grad()
    def update(self, params: Dict[str, torch.Tensor]) -> None:
        """After an optimizer step: copy on the first call, then lerp toward the weights."""
        for name, avg in self.params.items():
            src = params[name].detach()
            if self.steps == 0:
                avg.copy_(src)
            else:
                avg.lerp_(src.to(avg.dtype), self.momentum)
        self.steps += 1

    @contextmanager
    def swapped_in(self, params: Dict[str, torch.Tensor]) -> Iterator[None]:
        """Evaluate with the EMA weights in the model; the trained weights come back bit for bit."""
        saved = {}
        with torch.no_grad():
            for name, p in params.items():
                saved[name] = p.detach().clone()
                p.copy_(self.params[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])

    def state_dict(self) -> Dict[str, Any]:
        return {"momentum": self.momentum, "steps": self.steps,
                "params": OrderedDict((n, t.detach().cpu().clone()) for n, t in self.params.items())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = sorted(set(self.params) - set(state["params"]))
        unexpected = sorted(set(state["params"]) - set(self.params))
        if missing or unexpected:
            raise ConfigError(f"checkpoint EMA does not match the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}")
        with torch.no_grad():
            for name, avg in self.params.items():
                avg.copy_(state["params"][name])
        self.steps = int(state["steps"])


def load_ema_weights(model: torch.nn.Module, path: str) -> int:
    """Put a training checkpoint's EMA into ``model`` (``vit-accel eval --ema``); returns its updates."""
    from ..checkpoints.files import load_plain      # tensors and plain types only, never code

    obj = load_plain(path)
    ema = obj.get("ema") if isinstance(obj, dict) else None
    if not ema:
        raise ConfigError(f"{path} holds no EMA weights (its run had train.ema_momentum 0); evaluate without --ema")
    params = dict(model.named_parameters())
    wrong = sorted(n for n in params if n not in ema["params"] or ema["params"][n].shape != params[n].shape)
    if wrong or len(ema["params"]) != len(params):
        raise ConfigError(f"{path}: the EMA weights do not fit this model (first: {(wrong or sorted(ema['params']))[0]}); "
                          f"evaluate with the recipe and image size the run trained with")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ema["params"][name])
    return int(ema["steps"])
