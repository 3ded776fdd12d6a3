"""Read and write ViT checkpoints: timm, MMClassification/mmpretrain, HF transformers, Google npz, ours.

Every reader (``files.py``; key maps in ``formats.py`` and ``npz.py``) turns a file into a
timm-keyed state dict (the keys of ``ViT.state_dict()``) plus hints the file knows beyond tensor
shapes (heads, LayerNorm eps). One loader (here) then fits it to a model: the position grid is
resampled, a head of another class count is dropped, a shape mismatch is an error that names
every tensor.

Our own formats:

* ``vit-accel``: a safetensors file of the timm-keyed state dict with metadata
  ``{"format": "vit-accel", "vit_config": json.dumps(ViTConfig.to_dict())}``.
* ``vit-accel-train`` (written by the engine): ``torch.save({"format": "vit-accel-train",
  "model": state_dict, "vit_config": dict, ...optimizer, step...})``; only ``model`` is read.

Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..hybrid import stem_stride
from ..model import VARIANT_OPTIONS, VARIANTS, ViT, ViTConfig
from .classnames import hf_label_maps, mmcls_meta
from .files import CheckpointError, Source, read
from .formats import FORMATS, MMCLS, rename, timm_to_hf
from .npz import timm_to_npz
from .timm_dir import refusal as timm_dir_refusal
from .timm_dir import write_timm_dir

__all__ = ["FORMATS", "CheckpointError", "LoadReport", "Source", "read", "load_pretrained", "config_from_checkpoint",
           "config_from_source", "model_from_checkpoint", "model_from_source", "save_checkpoint",
           "inspect_checkpoint", "resample_pos_embed",
           "add_convert_parser", "add_inspect_parser"]

HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # timm/mmcls files do not record heads
_IMPL_FIELDS = ("attn_impl", "norm_impl", "mlp_impl")  # where a model ran, not what it is


@dataclass
class LoadReport:
    format: str
    path: str = ""
    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    class_names: List[str] = field(default_factory=list)   # of the head it loaded ([]: none, or unnamed)

    def __str__(self) -> str:
        lines = ["loaded %d tensors from %s (format %s)" % (self.loaded, self.path, self.format)]
        for name in ("resized", "dropped", "missing", "unexpected", "notes"):
            for item in getattr(self, name):
                lines.append("  %-10s %s" % (name.rstrip("s") + ":", item))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Fitting a state dict to a model
# ---------------------------------------------------------------------------------------

def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + new_grid**2, D): bicubic on the grid, prefix kept."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    g = math.isqrt(grid.shape[1])
    if g * g != grid.shape[1]:
        raise CheckpointError("pos_embed has %d grid tokens, not a square grid" % grid.shape[1])
    x = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    x = F.interpolate(x, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=False)
    x = x.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)


def _fit(model: ViT, src: Source, strict_shapes: bool) -> LoadReport:
    own = model.state_dict()
    sd = dict(src.tensors)
    cfg = model.cfg
    rep = LoadReport(format=src.format, path=src.path, notes=list(src.notes))
    heads = src.hints.get("num_heads") or (src.hints.get("vit_config") or {}).get("num_heads")
    if heads and heads != cfg.num_heads:
        raise CheckpointError("%s: checkpoint has %d attention heads, the model %d; the weights would load "
                              "but compute something else" % (src.path, heads, cfg.num_heads))

    dropped = set()

    def drop(prefix: str, why: str) -> None:
        for k in [k for k in sd if k.startswith(prefix)]:
            rep.dropped.append("%s %s: %s" % (k, tuple(sd.pop(k).shape), why))
            dropped.add(k)

    ck_pre, md_pre = "pre_logits.fc.weight" in sd, "pre_logits.fc.weight" in own
    if ck_pre != md_pre:
        if ck_pre:
            drop("pre_logits.", "the model has no pre_logits (representation_size=None)")
        else:
            rep.notes.append("the checkpoint has no pre_logits; pre_logits.fc keeps its initialization")
        # a head trained on (or without) the tanh pre-logits features is wrong for the other path
        drop("head.", "the head was trained %s pre_logits" % ("with" if ck_pre else "without"))
    ck_fc, md_fc = "fc_norm.weight" in sd, "fc_norm.weight" in own
    if ck_fc != md_fc:  # e.g. an MAE or in-21k backbone fine-tuned with fc_norm, as timm does
        drop("fc_norm." if ck_fc else "norm.", "the model normalizes %s pooling (fc_norm=%s)"
             % ("before" if ck_fc else "after", md_fc))
        rep.notes.append("the checkpoint has no %s; it keeps its initialization" % ("norm" if ck_fc else "fc_norm"))
    if "head.weight" in sd:
        if "head.weight" not in own:
            drop("head.", "the model has no head (num_classes=0)")
        elif sd["head.weight"].shape != own["head.weight"].shape:
            drop("head.", "checkpoint has %d classes, the model %d; the model keeps its initialized head"
                 % (sd["head.weight"].shape[0], own["head.weight"].shape[0]))
    elif "head.weight" in own and "head.weight" not in src.tensors:
        rep.notes.append("no head in the checkpoint; the model keeps its initialized head")
    pos = sd.get("pos_embed")
    own_pos = own["pos_embed"]
    if pos is not None and pos.shape != own_pos.shape and pos.ndim == 3 and pos.shape[2] == own_pos.shape[2]:
        try:
            new = resample_pos_embed(pos, cfg.grid_size)
        except CheckpointError as e:
            raise CheckpointError("%s: %s" % (src.path, e)) from None
        rep.resized.append("pos_embed %s -> %s (bicubic %dx%d -> %dx%d grid, class token kept)" % (
            tuple(pos.shape), tuple(new.shape), math.isqrt(pos.shape[1] - 1), math.isqrt(pos.shape[1] - 1),
            cfg.grid_size, cfg.grid_size))
        sd["pos_embed"] = new
    _refuse(src.path, sorted(k for k in sd if k not in own), "has", "that a %s model does not have" % src.format)
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad and strict_shapes:
        raise CheckpointError("%s does not fit the model (%d tensors): %s" % (
            src.path, len(bad), "; ".join("%s: checkpoint %s vs model %s" % b for b in bad)))
    for k, a, b in bad:
        sd.pop(k)
        dropped.add(k)
        rep.dropped.append("%s %s: the model has %s (strict_shapes=False)" % (k, a, b))
    fit = {k: v for k, v in sd.items() if k in own}
    if not fit:
        raise CheckpointError("%s: none of its %d tensors matches a vit-accel ViT as format %r (first keys: %s)"
                              % (src.path, len(src.tensors), src.format, ", ".join(list(src.tensors)[:5])))
    rep.missing = sorted(k for k in own if k not in fit and k not in dropped)
    rep.unexpected = sorted(k for k in sd if k not in own)
    optional = ("head.", "pre_logits.") + (("fc_norm.", "norm.") if ck_fc != md_fc else ())
    _refuse(src.path, [k for k in rep.missing if not k.startswith(optional)], "lacks", "the model needs")
    model.load_state_dict(fit, strict=False)
    rep.loaded = len(fit)
    vc = src.hints.get("vit_config") or {}
    names = list(vc.get("class_names") or src.hints.get("class_names") or [])
    if "head.weight" in fit and len(names) == fit["head.weight"].shape[0]:
        rep.class_names = names
    eps = src.hints.get("layer_norm_eps", vc.get("layer_norm_eps"))
    if eps is not None and not math.isclose(eps, cfg.layer_norm_eps, rel_tol=1e-6):
        rep.notes.append("warning: the checkpoint's layer_norm_eps is %g, the model's %g; build the model with "
                         "config_from_checkpoint() to match" % (eps, cfg.layer_norm_eps))
    for name in ("gelu_approximate", "global_pool"):
        want = src.hints.get(name, vc.get(name))
        if want is not None and want != getattr(cfg, name):
            rep.notes.append("warning: the checkpoint's %s is %r, the model's %r" % (name, want, getattr(cfg, name)))
    return rep


def _names(keys: List[str], limit: int = 6) -> str:
    """``a, b, c (+N more)``; runs of one module collapse to its prefix (``patch_embed.backbone.*: 156``)."""
    groups: Dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        head = ".".join(parts[:2]) if parts[0] in ("patch_embed", "blocks") and len(parts) > 2 else k
        groups[head] = groups.get(head, 0) + 1
    items = ["%s.* (%d tensors)" % (g, n) if n > 1 else (g if g in keys else g + ".*") for g, n in groups.items()]
    return ", ".join(items[:limit]) + (" (+%d more)" % (len(items) - limit) if len(items) > limit else "")


def _refuse(path: str, keys: List[str], verb: str, which: str) -> None:
    """A file with tensors the model cannot use, or without ones it needs, describes another model:
    refuse it rather than run with random parts (heads and pre-logits may be absent; they are reported)."""
    if keys:
        raise CheckpointError("%s: %s %d tensors %s: %s; the file describes another model (build that one from the "
                              "file: model_from_checkpoint, or see vit-accel inspect)"
                              % (path, verb, len(keys), which, _names(keys)))


def load_pretrained(model: ViT, path, format: str = "auto", strict_shapes: bool = True) -> LoadReport:
    """Load a checkpoint of any supported format (a path, or a Source already ``read``) into ``model``;
    see LoadReport for what changed."""
    return _fit(model, path if isinstance(path, Source) else read(path, format), strict_shapes)


def _infer(src: Source, overrides: Dict[str, Any]) -> ViTConfig:
    known = set(ViTConfig.__dataclass_fields__)
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError("unknown ViT option(s) %s; valid: %s" % (bad, sorted(known)))
    # A checkpoint saved where Triton ran must still open on a CPU: ops are chosen by the caller.
    # The variant name is re-derived from the shapes below, not trusted from the file.
    vc = {k: v for k, v in (src.hints.get("vit_config") or {}).items()
          if k in known and k not in _IMPL_FIELDS and k != "name"}
    sd = src.tensors
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError("%s: no patch embedding found; cannot infer the model shape" % src.path)
    width, in_chans, patch = sd["patch_embed.proj.weight"].shape[:3]
    hybrid = _hybrid_layers(sd)
    if hybrid:  # the projection patches the ResNet feature map; the image enters the stem conv
        in_chans = sd[_STEM_CONV].shape[1]
    depth = 1 + max([int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, sd) if m] or [-1])
    if "pos_embed" not in sd and "img_size" not in overrides:
        raise CheckpointError("%s: no pos_embed; cannot infer the image size, pass img_size=" % src.path)
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else 1
    if math.isqrt(tokens - 1) ** 2 != tokens - 1 and "img_size" not in overrides:
        raise CheckpointError("%s: pos_embed has %d tokens, not a class token + a square grid; pass img_size="
                              % (src.path, tokens))
    c = dict(width=width, in_chans=in_chans, patch_size=patch, depth=depth, hybrid_layers=hybrid,
             img_size=math.isqrt(tokens - 1) * patch * stem_stride(hybrid),
             num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
             representation_size=sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None,
             qkv_bias="blocks.0.attn.qkv.bias" in sd)
    if "fc_norm.weight" in sd:  # timm's avg-pool layout: no final norm, a LayerNorm on the pooled features
        c.update(fc_norm=True, global_pool="avg")
    if "blocks.0.mlp.fc1.weight" in sd:
        c["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    for k in ("layer_norm_eps", "gelu_approximate", "drop_rate", "attn_drop_rate", "num_heads"):
        if src.hints.get(k) is not None:
            c[k] = src.hints[k]
    if src.hints.get("class_names") and not vc.get("class_names"):
        c["class_names"] = src.hints["class_names"]
    c.update(vc)
    c.update(overrides)
    if len(c.get("class_names") or ()) != c["num_classes"] and "class_names" not in overrides:
        c["class_names"] = ()  # another head than the file's: its names do not apply
    if not c.get("num_heads"):  # a variant of the same shape and kind knows its heads (vit-s16-orig: 8)
        shape = (c["width"], c["depth"], c.get("mlp_ratio", 4.0), c["patch_size"])
        c["num_heads"] = next((v[2] for n, v in VARIANTS.items()
                               if (v[0], v[1], v[3], v[4]) == shape and _same_kind(n, c)), None)
    if not c.get("num_heads"):
        if width not in HEADS_BY_WIDTH:
            raise CheckpointError("%s: a %s checkpoint does not record its attention heads and width %d is not "
                                  "in the variant table; pass num_heads= (CLI: --num-heads)"
                                  % (src.path, src.format, width))
        c["num_heads"] = HEADS_BY_WIDTH[width]
    if "name" not in overrides:
        key = (c["width"], c["depth"], c["num_heads"], c.get("mlp_ratio", 4.0), c["patch_size"])
        c["name"] = next((n for n, v in VARIANTS.items() if v == key and _same_kind(n, c)), "custom")
        # what the tensors cannot show (timm's first small ViT: its softmax scale and LayerNorm eps)
        for k, v in VARIANT_OPTIONS.get(c["name"], {}).items():
            if k not in overrides and k not in vc and not (k == "layer_norm_eps" and "layer_norm_eps" in src.hints):
                c[k] = v
    return ViTConfig(**c)


_STEM_CONV = "patch_embed.backbone.stem.conv.weight"


def _hybrid_layers(sd: Dict[str, torch.Tensor]) -> Tuple[int, ...]:
    """Blocks per stage of a hybrid's ResNet stem, from timm's names; () for a plain ViT."""
    if _STEM_CONV not in sd:
        return ()
    rx = re.compile(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.")
    blocks: Dict[int, int] = {}
    for m in filter(None, map(rx.match, sd)):
        i, j = int(m.group(1)), int(m.group(2))
        blocks[i] = max(blocks.get(i, 0), j + 1)
    return tuple(blocks[i] for i in sorted(blocks))


def _same_kind(name: str, c: Dict[str, Any]) -> bool:
    """A variant matches only with its own stem and qkv-bias layout (the numbers alone can coincide)."""
    opts = VARIANT_OPTIONS.get(name, {})
    return tuple(opts.get("hybrid_layers", ())) == tuple(c["hybrid_layers"]) and \
        opts.get("qkv_bias", True) == c["qkv_bias"]


def config_from_checkpoint(path: str, format: str = "auto", **overrides) -> ViTConfig:
    """The ViTConfig a checkpoint was trained with (shapes + what the file records), then overrides."""
    return _infer(read(path, format), overrides)


def config_from_source(src: Source, **overrides) -> ViTConfig:
    """``config_from_checkpoint`` of a file already ``read``."""
    return _infer(src, overrides)


def model_from_checkpoint(path: str, format: str = "auto", **overrides) -> Tuple[ViT, LoadReport]:
    """Build the model a checkpoint describes (overrides applied, e.g. img_size=384) and load it."""
    return model_from_source(read(path, format), **overrides)


def model_from_source(src: Source, **overrides) -> Tuple[ViT, LoadReport]:
    """``model_from_checkpoint`` of a file already ``read`` (a file is read once)."""
    model = ViT(_infer(src, overrides))
    return model, _fit(model, src, strict_shapes=True)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

TIMM_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")


def save_checkpoint(model: ViT, path: str, format: str = "vit-accel", preprocess: Dict[str, Any] = None) -> str:
    """Write ``model`` in one of FORMATS; returns the path written.

    hf is a directory; timm is a directory (timm's config.json with ``label_names`` + weights) unless
    ``path`` ends in a file suffix (.pth, .safetensors, ...: a bare state dict). ``preprocess``:
    mean/std (0..1), interpolation and crop_pct for timm's pretrained config. Class names
    (``model.cfg.class_names``) go where each format keeps them (classnames.py).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    if format not in FORMATS:
        raise CheckpointError("unknown checkpoint format %r; choose one of: %s" % (format, ", ".join(FORMATS)))
    cfg = model.cfg
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format in ("hf", "mmcls") and cfg.global_pool != "token":
        raise CheckpointError("%s ViTs classify the class token; a global_pool=%r model has no equivalent"
                              % (format, cfg.global_pool))
    if format in ("hf", "mmcls") and cfg.hybrid_layers:
        raise CheckpointError("%s ViTs have no ResNet stem; save a hybrid as timm, npz or vit-accel" % format)
    if format in ("hf", "mmcls", "npz") and cfg.fc_norm:
        raise CheckpointError("%s ViTs have no LayerNorm after pooling (fc_norm); save as timm or vit-accel"
                              % format)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if format == "timm" and (os.path.isdir(path) or not path.lower().endswith(TIMM_FILE_SUFFIXES)):
        why = timm_dir_refusal(cfg)
        if why:
            raise CheckpointError("timm's directory layout cannot describe %s; write a timm file instead (a DST "
                                  "ending in .pth or .safetensors, which has no place for class names)" % why)
        write_timm_dir(sd, cfg, path, preprocess)
    elif format == "timm":
        if path.endswith(".safetensors"):
            save_file(sd, path, metadata={"format": "pt"})
        else:
            torch.save(sd, path)
    elif format == "vit-accel":
        save_file(sd, path, metadata={"format": "vit-accel", "vit_config": json.dumps(cfg.to_dict())})
    elif format == "mmcls":
        meta = dict(mmcls_meta(cfg.class_names), converted_by="vit-accel", vit_config=cfg.to_dict())
        torch.save({"meta": meta, "state_dict": rename(sd, MMCLS, to_timm=False)}, path)
    elif format == "npz":
        with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
            np.savez(f, **timm_to_npz(sd, cfg.num_heads, cfg.to_dict()))
    else:
        os.makedirs(path, exist_ok=True)
        with_head = cfg.num_classes > 0
        hf = {
            "architectures": ["ViTForImageClassification" if with_head else "ViTModel"], "model_type": "vit",
            "hidden_size": cfg.width, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.mlp_hidden, "image_size": cfg.img_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.in_chans, "layer_norm_eps": cfg.layer_norm_eps, "qkv_bias": cfg.qkv_bias,
            "hidden_act": "gelu" if cfg.gelu_approximate == "none" else "gelu_pytorch_tanh",
            "hidden_dropout_prob": cfg.drop_rate, "attention_probs_dropout_prob": cfg.attn_drop_rate,
            "initializer_range": 0.02, "encoder_stride": cfg.patch_size, "pooler_act": "tanh",
            "pooler_output_size": cfg.representation_size or cfg.width, "vit_accel_config": cfg.to_dict(),
        }
        if with_head:
            hf.update(hf_label_maps(cfg.class_names, cfg.num_classes))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        save_file(timm_to_hf(sd, with_prefix=with_head), os.path.join(path, "model.safetensors"),
                  metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------
# CLI pieces (wired into vit_accel/cli.py)
# ---------------------------------------------------------------------------------------

def _cli_error(cmd: str, e: Exception) -> int:
    print("vit-accel %s: error: %s" % (cmd, " ".join(str(e).split())), file=sys.stderr)
    return 2


def _convert(args) -> int:
    try:
        over = {"num_heads": args.num_heads} if args.num_heads else {}
        src = read(args.src, args.from_format)
        model, rep = model_from_source(src, **over)
        save_checkpoint(model, args.dst, args.to_format, preprocess=recipe_preprocess(src.hints.get("recipe")))
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        return _cli_error("convert", e)
    print(rep)
    names = model.cfg.class_names
    print("wrote %s (format %s; %s)" % (args.dst, args.to_format, "%d class names" % len(names) if names else
                                        "no class names: the source has none" if model.cfg.num_classes else "no head"))
    return 0


def recipe_preprocess(recipe: Any) -> Dict[str, Any]:
    """timm's pretrained-config preprocessing of a training recipe (mean/std in 0..1), or {}."""
    data = (recipe or {}).get("data") if isinstance(recipe, dict) else None
    if not isinstance(data, dict) or "mean" not in data:
        return {}
    out = {"mean": [m / 255.0 for m in data["mean"]], "std": [s / 255.0 for s in data["std"]],
           "interpolation": data.get("eval_interpolation") or data.get("interpolation", "bilinear")}
    if data.get("eval_crop_fraction"):
        out["crop_pct"] = data["eval_crop_fraction"]
    return out


def inspect_checkpoint(path: str, format: str = "auto", **overrides) -> Dict[str, Any]:
    """What a checkpoint holds: format, variant, sizes, classes, parameter count."""
    src = read(path, format)
    cfg = _infer(src, overrides)
    with torch.device("meta"):  # count parameters without allocating or initializing them
        params = ViT(cfg).num_params()
    return {"path": os.fspath(path), "format": src.format, "variant": cfg.name, "img_size": cfg.img_size,
            "patch_size": cfg.patch_size, "hybrid_layers": list(cfg.hybrid_layers), "qk_scale": cfg.qk_scale,
            "width": cfg.width, "depth": cfg.depth, "num_heads": cfg.num_heads,
            "num_classes": cfg.num_classes, "representation_size": cfg.representation_size,
            "layer_norm_eps": cfg.layer_norm_eps, "parameters": params, "class_names": list(cfg.class_names)}


def _inspect(args) -> int:
    try:
        over = {"num_heads": args.num_heads} if args.num_heads else {}
        info = inspect_checkpoint(args.ckpt, args.from_format, **over)
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        return _cli_error("inspect", e)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print("%-20s %s" % (k, "{:,}".format(v) if k == "parameters" else _shown_names(v) if k == "class_names"
                                else v))
    return 0


def _shown_names(names: List[str], limit: int = 20) -> str:
    if not names:
        return "none (outputs are shown as class 0, class 1, ...)"
    more = " (+%d more; --json lists all)" % (len(names) - limit) if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_format", default="auto", choices=("auto",) + FORMATS,
                   help="source format (default: detect from the extension and tensor names)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for timm/mmcls files whose width is not in the variant table")


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert a ViT checkpoint between formats",
                              description="Convert a ViT checkpoint: vit-accel convert SRC DST --to hf")
    p.add_argument("src", help="checkpoint file, or an HF transformers directory")
    p.add_argument("dst", help="output file (hf: a directory)")
    p.add_argument("--to", dest="to_format", required=True, choices=FORMATS)
    _common(p)
    p.set_defaults(func=_convert)
    return p


def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="describe a ViT checkpoint",
                              description="Show a checkpoint's format, variant, sizes and parameter count")
    p.add_argument("ckpt", help="checkpoint file, or an HF transformers directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    p.set_defaults(func=_inspect)
    return p
