"""timm's directory layout: ``config.json`` (architecture, model_args, pretrained_cfg, label_names) and
``model.safetensors``, what ``timm.models.save_for_hf`` writes and
``timm.create_model("local-dir:DIR", pretrained=True)`` reads.

A single timm ``.pth`` / ``.safetensors`` file holds a bare state dict with no place for class
names or preprocessing; the directory keeps both. Only what timm's ``VisionTransformer`` can
rebuild from JSON arguments is written this way (no ResNet stem, no pre-logits, LayerNorm eps 1e-6,
the softmax scale of its head dimension); anything else is refused with the file alternative.
Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

from .classnames import as_names

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")  # timm's preference
_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
# timm's VisionTransformer defaults that our models share (timm vision_transformer.py, _cfg)
_DEFAULT_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop_pct": 0.9}


def timm_config(path: str) -> Optional[Dict[str, Any]]:
    """DIR/config.json when it is timm's (``architecture``, no HF ``model_type``), else None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and "architecture" in cfg and "model_type" not in cfg else None


def timm_weights(path: str) -> Optional[str]:
    """The weights file timm would load from DIR (its order of preference), or None."""
    return next((os.path.join(path, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)


def timm_hints(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What a timm config.json says beyond the tensors: heads, eps, activation, class names."""
    args = cfg.get("model_args") if isinstance(cfg.get("model_args"), dict) else {}
    pre = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    hints: Dict[str, Any] = {"layer_norm_eps": 1e-6}
    if isinstance(args.get("num_heads"), int):
        hints["num_heads"] = args["num_heads"]
    if args.get("act_layer") in ("gelu_tanh", "gelu_pytorch_tanh"):
        hints["gelu_approximate"] = "tanh"
    if isinstance(cfg.get("vit_accel_config"), dict):
        hints["vit_config"] = cfg["vit_accel_config"]
    names = as_names(cfg.get("label_names")) or as_names(pre.get("label_names"))
    if names:
        hints["class_names"] = names
    return hints


def refusal(cfg) -> Optional[str]:
    """What of a ViTConfig timm's JSON model arguments cannot express, or None."""
    if cfg.hybrid_layers:
        return "a ResNet stem (timm's hybrid is another architecture)"
    if cfg.representation_size:
        return "pre-logits (timm's VisionTransformer has none)"
    if abs(cfg.layer_norm_eps - 1e-6) > 1e-12:
        return "LayerNorm eps %g (timm's VisionTransformer takes 1e-6 from JSON)" % cfg.layer_norm_eps
    if cfg.qk_scale is not None and abs(cfg.qk_scale - cfg.head_dim ** -0.5) > 1e-12:
        return "a softmax scale other than head_dim ** -0.5"
    return None


def model_args(cfg) -> Dict[str, Any]:
    """``timm.models.vision_transformer.VisionTransformer`` keywords for our ``ViTConfig``."""
    args = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                global_pool=cfg.global_pool, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, fc_norm=cfg.fc_norm, class_token=True)
    if cfg.gelu_approximate == "tanh":
        args["act_layer"] = "gelu_tanh"
    return args


def write_timm_dir(sd: Dict[str, torch.Tensor], cfg, path: str, preprocess: Optional[Dict[str, Any]] = None) -> str:
    """Write DIR/config.json and DIR/model.safetensors (the caller checks ``refusal(cfg)`` first)."""
    from safetensors.torch import save_file

    pre = dict(_DEFAULT_PREPROCESS, **(preprocess or {}))
    pretrained_cfg = dict(pre, input_size=[cfg.in_chans, cfg.img_size, cfg.img_size], num_classes=cfg.num_classes,
                          fixed_input_size=True, first_conv="patch_embed.proj", classifier="head")
    config = {"architecture": "vit_%s_patch16_224" % _SIZES.get(cfg.width, "base"), "num_classes": cfg.num_classes,
              "num_features": cfg.width, "global_pool": cfg.global_pool, "model_args": model_args(cfg),
              "pretrained_cfg": pretrained_cfg, "vit_accel_config": cfg.to_dict()}
    if cfg.class_names:
        config["label_names"] = list(cfg.class_names)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path
