"""vit-accel: one Vision Transformer, trained the same way on CPU, NVIDIA GPUs and Graphcore IPUs."""
__version__ = "0.1.0"

from .model import VARIANTS, ViT, ViTConfig, create_vit, vit_config  # noqa: F401
