"""vit-accel: one Vision Transformer, trained the same way on CPU, NVIDIA GPUs and Graphcore IPUs."""
__version__ = "0.1.0"

# The model's names load torch: imported on first use, so that `vit-accel configs`, `--help` and a
# recipe's errors answer without it.
_MODEL_NAMES = ("VARIANTS", "ViT", "ViTConfig", "create_vit", "vit_config")
__all__ = list(_MODEL_NAMES)


def __getattr__(name):
    if name in _MODEL_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
