"""Triton kernels for the ViT hot paths: flash attention, LayerNorm(+residual), bias+GELU.

Depends on torch and triton only (never on vit_accel). Submodules are imported lazily so
`import vit_accel_kernels` works on machines without triton (the IPU/CPU paths never call them);
touching `vit_accel_kernels.flash_attention` (or importing `vit_accel_kernels.attention`) loads triton.

Each submodule holds its Triton kernels, plain launchers, one autograd.Function and the
pure-PyTorch fp32 reference that is both the CPU path and the test oracle.
"""
import importlib
import os

# Note: `vit_accel_kernels.layer_norm` and `vit_accel_kernels.bias_gelu` are the submodules (call
# `vit_accel_kernels.layer_norm.layer_norm(...)`); a package-level function of the same name would be
# overwritten by the import system the moment the submodule is imported.
__all__ = [
    "INTERPRETING",
    "interpreting",
    "check_device",
    "flash_attention",
    "attention_ref",
    "fused_layer_norm",
    "layer_norm_ref",
    "fused_bias_gelu",
    "bias_gelu_ref",
]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when a @triton.jit function is defined, so the kernel
    modules take this value once at import time, the moment their kernels are built.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETING = interpreting()


def check_device(op: str, device) -> None:
    """Kernels run on a CUDA device, or on the CPU under the interpreter: anything else is refused."""
    want = "cpu" if INTERPRETING else "cuda"
    if device.type != want:
        where = "the CPU under TRITON_INTERPRET=1" if INTERPRETING else "a CUDA device (or set TRITON_INTERPRET=1 for CPU)"
        raise ValueError(f"{op}: tensors must be on {where}, got {device}")

_SUBMODULES = ("attention", "layer_norm", "bias_gelu")
# public name -> (submodule, attribute)
_LAZY = {
    "flash_attention": ("attention", "flash_attention"),
    "attention_ref": ("attention", "attention_ref"),
    "fused_layer_norm": ("layer_norm", "layer_norm"),
    "layer_norm_ref": ("layer_norm", "layer_norm_ref"),
    "fused_bias_gelu": ("bias_gelu", "bias_gelu"),
    "bias_gelu_ref": ("bias_gelu", "bias_gelu_ref"),
}


def __getattr__(name):  # PEP 562: load triton only when a kernel is asked for
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        submodule, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{submodule}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
