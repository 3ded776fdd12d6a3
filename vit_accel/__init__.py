"""vit-accel: one Vision Transformer, trained the same way on CPU, NVIDIA GPUs and Graphcore IPUs."""
__version__ = "0.1.0"

# name -> the module defining it, imported on first use (the model's load torch): `vit-accel configs`,
# `--help` and a recipe's errors answer without it.
_WHERE = {"VARIANTS": "variants", "ViT": "model", "ViTConfig": "model", "create_vit": "model", "vit_config": "model"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module("." + _WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
