"""Numeric precision of the plain CPU/GPU step: autocast, backward and the optimizer step.

``Autocast`` covers fp32 (no autocast) and bf16/fp16 autocast without loss scaling;
``LossScaledFP16`` adds ``torch.amp.GradScaler``, without which fp16 gradients underflow.
DeepSpeed (zero.py) and PopTorch (ipu.py) scale losses inside their own engines.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast:
    """fp32, or bf16/fp16 autocast on ``device_type``; plain backward and optimizer step."""

    def __init__(self, precision: str, device_type: str):
        self.precision, self.device_type = precision, device_type

    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        return torch.autocast(device_type=self.device_type, dtype=dtype) if dtype else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
             clip_grad_norm: float) -> Tuple[Optional[float], bool]:
        """Clip (when ``clip_grad_norm`` > 0), step, zero the gradients; returns (grad norm, skipped)."""
        norm = _clip(params, clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, False

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint's ``extra`` must carry for an exact resume (nothing here)."""
        return {}

    def load_state_dict(self, payload: Dict[str, Any]) -> None:
        pass


class LossScaledFP16(Autocast):
    """fp16 autocast with dynamic loss scaling; a step with inf/nan gradients is skipped."""

    def __init__(self, device_type: str, scaler: Optional[torch.amp.GradScaler] = None):
        super().__init__("fp16", device_type)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(device_type)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
             clip_grad_norm: float) -> Tuple[Optional[float], bool]:
        if clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)       # clip the true gradients, not the scaled ones
        norm = _clip(params, clip_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)               # skipped when a gradient is inf/nan
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm, self.scaler.get_scale() < scale

    def state_dict(self) -> Dict[str, Any]:
        return {"grad_scaler": self.scaler.state_dict()}   # floats and ints only

    def load_state_dict(self, payload: Dict[str, Any]) -> None:
        if payload.get("grad_scaler"):
            self.scaler.load_state_dict(payload["grad_scaler"])


def _clip(params: Iterable[torch.nn.Parameter], max_norm: float) -> Optional[float]:
    if max_norm <= 0:
        return None
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def precision_for(precision: str, device_type: str, loss_scaling: bool) -> Autocast:
    """The strategy for ``precision``; fp16 gets a GradScaler when ``loss_scaling`` (no engine scales)."""
    if precision == "fp16" and loss_scaling:
        return LossScaledFP16(device_type)
    return Autocast(precision, device_type)
