"""Backends behind one small seam (base.py). Heavy imports (poptorch, deepspeed, triton) stay inside."""
from __future__ import annotations

import importlib
from typing import Optional

from ..errors import BackendUnavailable
from .base import Backend, StepResult  # noqa: F401

BACKENDS = {
    "cpu": ("vit_accel.backends.cpu", "CPUBackend"),
    "gpu": ("vit_accel.backends.gpu", "GPUBackend"),
    "ipu": ("vit_accel.backends.ipu", "IPUBackend"),
}
AUTO_ORDER = ("ipu", "gpu", "cpu")


def backend_class(name: str):
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def resolve_backend(name: str) -> str:
    """'auto' picks ipu, then gpu, then cpu by availability; others must be available or raise."""
    if name == "auto":
        for cand in AUTO_ORDER:
            try:
                if backend_class(cand).unavailable_reason() is None:
                    return cand
            except ImportError:  # a backend module that cannot even import is unavailable
                continue
        return "cpu"
    reason: Optional[str] = backend_class(name).unavailable_reason()
    if reason:
        raise BackendUnavailable(f"--backend {name}: {reason}")
    return name


def create_backend(name: str, recipe) -> Backend:
    return backend_class(resolve_backend(name))(recipe)
