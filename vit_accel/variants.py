"""The named ViT variants: numbers only, no torch (the recipe checks in config.py read them, and
`vit-accel configs` answers without loading torch). Python 3.8 compatible: the IPU path imports it."""
from __future__ import annotations

from typing import Dict, Tuple

# name: (width, depth, heads, mlp_ratio, patch_size)
VARIANTS: Dict[str, Tuple[int, int, int, float, int]] = {
    "vit-ti16": (192, 12, 3, 4.0, 16),
    "vit-s16": (384, 12, 6, 4.0, 16),
    "vit-s32": (384, 12, 6, 4.0, 32),
    "vit-b16": (768, 12, 12, 4.0, 16),
    "vit-b32": (768, 12, 12, 4.0, 32),
    "vit-l16": (1024, 24, 16, 4.0, 16),
    "vit-l32": (1024, 24, 16, 4.0, 32),
    "vit-h14": (1280, 32, 16, 4.0, 14),
    "vit-s16-orig": (768, 8, 8, 3.0, 16),     # timm's first "small" ViT (timm 0.3.x vit_small_patch16_224)
    "vit-b16-r50": (768, 12, 12, 4.0, 1),      # R50+ViT-B/16: patch 1 on the stride-16 ResNet feature map
}
# What a variant needs beyond the five numbers above (applied before the caller's overrides).
# vit-s16-orig (timm 0.3.2): no qkv bias, a softmax scale of width ** -0.5 (not head_dim ** -0.5; its
# weights were trained with it), nn.LayerNorm's default eps 1e-5.
VARIANT_OPTIONS: Dict[str, dict] = {
    "vit-s16-orig": dict(qkv_bias=False, qk_scale=768 ** -0.5, layer_norm_eps=1e-5),
    "vit-b16-r50": dict(hybrid_layers=(3, 4, 9)),
}
