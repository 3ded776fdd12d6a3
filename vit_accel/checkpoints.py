"""Read and write ViT checkpoints: timm, MMClassification/mmpretrain, HF transformers, Google npz, ours.

Every reader turns a file into a timm-keyed state dict (the keys of ``ViT.state_dict()``) plus
hints the file knows beyond tensor shapes (heads, LayerNorm eps); one loader then fits it to a
model: the position grid is resampled, a head of another class count is dropped, a shape
mismatch is an error that names every tensor.

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
import pickle
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .formats_npz import npz_to_timm, timm_to_npz
from .model import VARIANTS, ViT, ViTConfig

FORMATS = ("timm", "mmcls", "hf", "npz", "vit-accel")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # timm/mmcls files do not record heads
_IMPL_FIELDS = ("attn_impl", "norm_impl", "mlp_impl")  # where a model ran, not what it is


class CheckpointError(ValueError):
    """A file that is no usable ViT checkpoint, or does not fit the model."""


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

    def __str__(self) -> str:
        lines = ["loaded %d tensors from %s (format %s)" % (self.loaded, self.path, self.format)]
        for name in ("resized", "dropped", "missing", "unexpected", "notes"):
            for item in getattr(self, name):
                lines.append("  %-10s %s" % (name.rstrip("s") + ":", item))
        return "\n".join(lines)


@dataclass
class _Source:
    path: str
    format: str
    tensors: Dict[str, torch.Tensor]
    hints: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Key maps: (timm name, foreign name); "{i}" is a block index, a trailing "." a module prefix
# ---------------------------------------------------------------------------------------

_MMCLS = [
    ("cls_token", "backbone.cls_token"),
    ("pos_embed", "backbone.pos_embed"),
    ("patch_embed.proj.", "backbone.patch_embed.projection."),
    ("blocks.{i}.norm1.", "backbone.layers.{i}.ln1."),
    ("blocks.{i}.attn.qkv.", "backbone.layers.{i}.attn.qkv."),
    ("blocks.{i}.attn.proj.", "backbone.layers.{i}.attn.proj."),
    ("blocks.{i}.norm2.", "backbone.layers.{i}.ln2."),
    ("blocks.{i}.mlp.fc1.", "backbone.layers.{i}.ffn.layers.0.0."),
    ("blocks.{i}.mlp.fc2.", "backbone.layers.{i}.ffn.layers.1."),
    ("norm.", "backbone.ln1."),  # the final norm (mmcls final_norm=True)
    ("pre_logits.fc.", "head.layers.pre_logits."),
    ("head.", "head.layers.head."),
]
_HF = [  # HF ViT as saved by save_pretrained (q/k/v are split, handled apart)
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("blocks.{i}.norm1.", "encoder.layer.{i}.layernorm_before."),
    ("blocks.{i}.attn.proj.", "encoder.layer.{i}.attention.output.dense."),
    ("blocks.{i}.norm2.", "encoder.layer.{i}.layernorm_after."),
    ("blocks.{i}.mlp.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("blocks.{i}.mlp.fc2.", "encoder.layer.{i}.output.dense."),
    ("norm.", "layernorm."),
    ("pre_logits.fc.", "pooler.dense."),  # ViTModel's dense+tanh pooler is Google's pre_logits
    ("head.", "classifier."),
]
_HF_V5 = [  # transformers >= 5 in-memory names (a torch.save'd model.state_dict()) -> saved names
    ("encoder.layer.{i}.attention.attention.query.", "layers.{i}.attention.q_proj."),
    ("encoder.layer.{i}.attention.attention.key.", "layers.{i}.attention.k_proj."),
    ("encoder.layer.{i}.attention.attention.value.", "layers.{i}.attention.v_proj."),
    ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.attention.o_proj."),
    ("encoder.layer.{i}.intermediate.dense.", "layers.{i}.mlp.fc1."),
    ("encoder.layer.{i}.output.dense.", "layers.{i}.mlp.fc2."),
    ("encoder.layer.{i}.", "layers.{i}."),
]
_QKV = ("query", "key", "value")


def _rename(sd: Dict[str, torch.Tensor], table, to_timm: bool) -> Dict[str, torch.Tensor]:
    """Rename keys by a table; keys no rule matches pass through (and get reported as unexpected)."""
    rules = []
    for timm_name, other in table:
        src, dst = (other, timm_name) if to_timm else (timm_name, other)
        rx = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)") + ("" if src.endswith(".") else "$")
        rules.append((re.compile(rx), dst))
    out = {}
    for k, v in sd.items():
        for rx, dst in rules:
            m = rx.match(k)
            if m:
                k = dst.replace("{i}", m.groupdict().get("i") or "") + k[m.end():]
                break
        out[k] = v
    return out


def _strip(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _mmcls_to_timm(sd):
    sd = _strip(sd, "module.")
    if not any(k.startswith(("backbone.", "head.")) for k in sd):  # a backbone-only file
        sd = {"backbone." + k: v for k, v in sd.items()}
    return _rename(sd, _MMCLS, to_timm=True)


def _hf_to_timm(sd):
    sd = {(k[4:] if k.startswith("vit.") else k): v for k, v in _strip(sd, "module.").items()}
    sd = _rename(sd, _HF_V5, to_timm=True)  # v5 names -> saved names
    out = _rename(sd, _HF, to_timm=True)
    for i in sorted({int(m.group(1)) for m in map(re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.").match, out) if m}):
        for kind in ("weight", "bias"):
            names = ["encoder.layer.%d.attention.attention.%s.%s" % (i, n, kind) for n in _QKV]
            if all(n in out for n in names):
                out["blocks.%d.attn.qkv.%s" % (i, kind)] = torch.cat([out.pop(n) for n in names])
    return out


def _timm_to_hf(sd, with_prefix: bool):
    sd = dict(sd)
    for k in [k for k in sd if re.match(r"blocks\.\d+\.attn\.qkv\.", k)]:
        i, kind = k.split(".")[1], k.rsplit(".", 1)[1]
        for n, t in zip(_QKV, sd.pop(k).chunk(3)):
            sd["encoder.layer.%s.attention.attention.%s.%s" % (i, n, kind)] = t.contiguous()
    out = _rename(sd, _HF, to_timm=False)
    return {("vit." + k if with_prefix and not k.startswith("classifier.") else k): v for k, v in out.items()}


_DECODE = {
    "timm": lambda sd: _strip(sd, "module."),
    "vit-accel": lambda sd: sd,
    "mmcls": _mmcls_to_timm,
    "hf": _hf_to_timm,
}


def _detect(keys) -> Optional[str]:
    keys = list(keys)
    if any("embeddings.patch_embeddings." in k or re.match(r"(vit\.)?(encoder\.layer|layers)\.\d+\.attention\.", k) for k in keys):
        return "hf"
    if any("patch_embed.projection." in k or re.match(r"(backbone\.)?layers\.\d+\.(ln1|ffn)\.", k) for k in keys):
        return "mmcls"
    if any(k.endswith("patch_embed.proj.weight") or re.match(r"(module\.)?blocks\.\d+\.", k) for k in keys):
        return "timm"
    return None


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------

class _Opaque:
    """Stands in for a pickled object whose class we will not import (its code never runs)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; every other class becomes an inert ``_Opaque``.

    mmengine checkpoints pickle objects such as ``message_hub`` that torch's weights_only loader
    refuses; importing their classes would run foreign code, so they are replaced instead.
    """

    _SAFE = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
             ("builtins", "slice"), ("builtins", "complex"), ("_codecs", "encode"), ("torch", "Size"),
             ("torch", "device"), ("torch._tensor", "_rebuild_from_type_v2"),
             ("torch.nn.parameter", "Parameter"), ("numpy", "dtype"), ("numpy", "ndarray")}

    def find_class(self, module, name):
        if (module, name) in self._SAFE or (module == "torch._utils" and name.startswith("_rebuild")) or (
                module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar")):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        return type(name, (_Opaque,), {"__module__": "opaque." + module})


_TOLERANT_PICKLE = types.SimpleNamespace(
    Unpickler=_TolerantUnpickler, load=lambda f, **kw: _TolerantUnpickler(f, **kw).load(), __name__="tolerant_pickle")


def _fail(path: str, expected: str, e: Exception) -> CheckpointError:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return CheckpointError("%s: cannot be read as %s (%s%s)" % (path, expected, type(e).__name__, ": " + msg if msg else ""))


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a pickle with objects besides tensors (mmengine), or no pickle at all: try once more
    except Exception as e:
        raise _fail(path, "a PyTorch checkpoint", e) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TOLERANT_PICKLE)
    except Exception as e:
        raise _fail(path, "a PyTorch checkpoint", e) from e


def _safetensors_load(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise _fail(path, "a safetensors file", e) from e


def _sniff(path: str) -> str:
    """'npz', 'safetensors', 'json' or 'torch', from the extension, else from the first bytes."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".npz", ".safetensors", ".json"):
        return ext[1:]
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:2] == b"PK":  # a zip: numpy's npz or torch's own format
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".npy") for n in z.namelist()):
                    return "npz"
        except zipfile.BadZipFile:
            pass
        return "torch"
    if len(head) > 9 and head[8:10] == b'{"':  # safetensors: u64 header length, then JSON
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "torch"


def _read_hf_dir(path: str) -> _Source:
    names = [n for n in HF_WEIGHTS if os.path.isfile(os.path.join(path, n))]
    if not names:
        raise CheckpointError("%s: a directory with no weights; expected an HF transformers ViT directory holding "
                              "config.json and one of %s" % (path, ", ".join(HF_WEIGHTS)))
    weights = os.path.join(path, names[0])
    files = [weights]
    if weights.endswith(".index.json"):  # sharded: the index maps tensor -> shard file
        with open(weights) as f:
            files = [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    sd: Dict[str, torch.Tensor] = {}
    for fn in files:
        sd.update(_safetensors_load(fn)[0] if fn.endswith(".safetensors") else _unwrap(_torch_load(fn), fn))
    src = _Source(path, "hf", _hf_to_timm(sd))
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        src.notes.append("no config.json; heads and eps are inferred, not read")
        return src
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise _fail(cfg_path, "an HF config.json", e) from e
    act = hf.get("hidden_act", "gelu")
    src.hints.update(num_heads=hf.get("num_attention_heads"), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                     drop_rate=hf.get("hidden_dropout_prob", 0.0), attn_drop_rate=hf.get("attention_probs_dropout_prob", 0.0),
                     gelu_approximate="none" if act == "gelu" else "tanh")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        src.notes.append("warning: HF hidden_act %r is not a GELU; vit-accel computes GELU" % act)
    if isinstance(hf.get("vit_accel_config"), dict):
        src.hints["vit_config"] = hf["vit_accel_config"]
    return src


def _unwrap(obj, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError("%s: holds a %s, expected a dict of tensors (a state dict)" % (path, type(obj).__name__))
    for key in ("state_dict", "model", "module", "params"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError("%s: a dict with no tensors (keys: %s); expected a state dict" % (path, ", ".join(map(str, list(obj)[:6]))))
    return sd


def _read(path: str, format: str = "auto") -> _Source:
    path = os.fspath(path)
    if format != "auto" and format not in FORMATS:
        raise CheckpointError("unknown checkpoint format %r; choose one of: auto, %s" % (format, ", ".join(FORMATS)))
    if not os.path.exists(path):
        raise CheckpointError("%s: no such file or directory" % path)
    if os.path.isdir(path):
        if format not in ("auto", "hf"):
            raise CheckpointError("%s: is a directory; only the 'hf' format is a directory, %r expects a file" % (path, format))
        return _read_hf_dir(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError("%s: the file is empty; expected a checkpoint (.pth/.bin/.safetensors/.npz)" % path)
    kind = _sniff(path)
    if kind == "json":
        raise CheckpointError("%s: a JSON file, not a checkpoint; for an HF transformers model pass the directory "
                              "holding config.json and the weights" % path)
    if (kind == "npz") != (format == "npz") and format != "auto":
        raise CheckpointError("%s: format %r does not match the file (%s)" % (path, format, "a numpy .npz archive"
                              if kind == "npz" else "not an .npz archive"))
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise _fail(path, "a numpy .npz archive", e) from e
        tensors, hints, notes = npz_to_timm(arrays)
        return _Source(path, "npz", tensors, hints, notes)
    hints: Dict[str, Any] = {}
    if kind == "safetensors":
        sd, meta = _safetensors_load(path)
        if meta.get("format") == "vit-accel":
            hints["vit_config"] = json.loads(meta.get("vit_config", "{}"))
            if format == "auto":
                format = "vit-accel"
    else:
        obj = _torch_load(path)
        if isinstance(obj, dict) and obj.get("format") == "vit-accel-train":
            hints["vit_config"] = obj.get("vit_config") or {}
            format = "vit-accel" if format == "auto" else format
            obj = obj.get("model")
        elif isinstance(obj, dict) and isinstance(obj.get("meta"), dict) and isinstance(obj["meta"].get("vit_config"), dict):
            hints["vit_config"] = obj["meta"]["vit_config"]  # an mmcls file that we wrote
        sd = _unwrap(obj, path)
    if format == "auto":
        format = _detect(sd) or ""
        if not format:
            raise CheckpointError("%s: tensors do not look like a ViT of any known format (first keys: %s); "
                                  "pass format= one of %s" % (path, ", ".join(list(sd)[:5]), ", ".join(FORMATS)))
    return _Source(path, format, _DECODE[format](sd), hints)


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


def _fit(model: ViT, src: _Source, strict_shapes: bool) -> LoadReport:
    own = model.state_dict()
    sd = dict(src.tensors)
    cfg = model.cfg
    rep = LoadReport(format=src.format, path=src.path, notes=list(src.notes))
    heads = src.hints.get("num_heads") or (src.hints.get("vit_config") or {}).get("num_heads")
    if heads and heads != cfg.num_heads:
        raise CheckpointError("%s: checkpoint has %d attention heads, the model %d; the weights would load "
                              "but compute something else" % (src.path, heads, cfg.num_heads))

    def drop(prefix: str, why: str) -> None:
        for k in [k for k in sd if k.startswith(prefix)]:
            rep.dropped.append("%s %s: %s" % (k, tuple(sd.pop(k).shape), why))

    ck_pre, md_pre = "pre_logits.fc.weight" in sd, "pre_logits.fc.weight" in own
    if ck_pre != md_pre:
        if ck_pre:
            drop("pre_logits.", "the model has no pre_logits (representation_size=None)")
        else:
            rep.notes.append("the checkpoint has no pre_logits; pre_logits.fc keeps its initialization")
        # a head trained on (or without) the tanh pre-logits features is wrong for the other path
        drop("head.", "the head was trained %s pre_logits" % ("with" if ck_pre else "without"))
    if "head.weight" in sd:
        if "head.weight" not in own:
            drop("head.", "the model has no head (num_classes=0)")
        elif sd["head.weight"].shape != own["head.weight"].shape:
            drop("head.", "checkpoint has %d classes, the model %d; the model keeps its initialized head"
                 % (sd["head.weight"].shape[0], own["head.weight"].shape[0]))
    elif "head.weight" in own:
        rep.notes.append("no head in the checkpoint; the model keeps its initialized head")
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape and pos.ndim == 3 and pos.shape[2] == own["pos_embed"].shape[2]:
        new = resample_pos_embed(pos, cfg.grid_size)
        rep.resized.append("pos_embed %s -> %s (bicubic %dx%d -> %dx%d grid, class token kept)" % (
            tuple(pos.shape), tuple(new.shape), math.isqrt(pos.shape[1] - 1), math.isqrt(pos.shape[1] - 1),
            cfg.grid_size, cfg.grid_size))
        sd["pos_embed"] = new
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad and strict_shapes:
        raise CheckpointError("%s does not fit the model (%d tensors): %s" % (
            src.path, len(bad), "; ".join("%s: checkpoint %s vs model %s" % b for b in bad)))
    for k, a, b in bad:
        sd.pop(k)
        rep.dropped.append("%s: checkpoint %s vs model %s (strict_shapes=False)" % (k, a, b))
    fit = {k: v for k, v in sd.items() if k in own}
    if not fit:
        raise CheckpointError("%s: none of its %d tensors matches a vit-accel ViT as format %r (first keys: %s)"
                              % (src.path, len(src.tensors), src.format, ", ".join(list(src.tensors)[:5])))
    model.load_state_dict(fit, strict=False)
    rep.loaded = len(fit)
    rep.missing = sorted(k for k in own if k not in fit and not any(d.startswith(k + " ") for d in rep.dropped))
    rep.unexpected = sorted(k for k in sd if k not in own)
    vc = src.hints.get("vit_config") or {}
    eps = src.hints.get("layer_norm_eps", vc.get("layer_norm_eps"))
    if eps is not None and not math.isclose(eps, cfg.layer_norm_eps, rel_tol=1e-6):
        rep.notes.append("warning: the checkpoint's layer_norm_eps is %g, the model's %g; build the model with "
                         "config_from_checkpoint() to match" % (eps, cfg.layer_norm_eps))
    for name in ("gelu_approximate", "global_pool"):
        want = src.hints.get(name, vc.get(name))
        if want is not None and want != getattr(cfg, name):
            rep.notes.append("warning: the checkpoint's %s is %r, the model's %r" % (name, want, getattr(cfg, name)))
    return rep


def load_pretrained(model: ViT, path: str, format: str = "auto", strict_shapes: bool = True) -> LoadReport:
    """Load a checkpoint of any supported format into ``model``; see LoadReport for what changed."""
    return _fit(model, _read(path, format), strict_shapes)


def _infer(src: _Source, overrides: Dict[str, Any]) -> ViTConfig:
    known = set(ViTConfig.__dataclass_fields__)
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError("unknown ViT option(s) %s; valid: %s" % (bad, sorted(known)))
    # a checkpoint saved where Triton ran must still open on a CPU: ops are chosen by the caller
    vc = {k: v for k, v in (src.hints.get("vit_config") or {}).items() if k in known and k not in _IMPL_FIELDS}
    sd = src.tensors
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError("%s: no patch embedding found; cannot infer the model shape" % src.path)
    width, in_chans, patch = sd["patch_embed.proj.weight"].shape[:3]
    depth = 1 + max([int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, sd) if m] or [-1])
    if "pos_embed" not in sd and "img_size" not in overrides:
        raise CheckpointError("%s: no pos_embed; cannot infer the image size, pass img_size=" % src.path)
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else 1
    c = dict(width=width, in_chans=in_chans, patch_size=patch, depth=depth, img_size=math.isqrt(tokens - 1) * patch,
             num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
             representation_size=sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None,
             qkv_bias="blocks.0.attn.qkv.bias" in sd)
    if "blocks.0.mlp.fc1.weight" in sd:
        c["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    for k in ("layer_norm_eps", "gelu_approximate", "drop_rate", "attn_drop_rate", "num_heads"):
        if src.hints.get(k) is not None:
            c[k] = src.hints[k]
    c.update(vc)
    c.update(overrides)
    if not c.get("num_heads"):
        if width not in HEADS_BY_WIDTH:
            raise CheckpointError("%s: a %s checkpoint does not record its attention heads and width %d is not in "
                                  "the variant table; pass num_heads=" % (src.path, src.format, width))
        c["num_heads"] = HEADS_BY_WIDTH[width]
    if "name" not in vc and "name" not in overrides:
        key = (c["width"], c["depth"], c["num_heads"], c.get("mlp_ratio", 4.0), c["patch_size"])
        c["name"] = next((n for n, v in VARIANTS.items() if v == key), "custom")
    return ViTConfig(**c)


def config_from_checkpoint(path: str, format: str = "auto", **overrides) -> ViTConfig:
    """The ViTConfig a checkpoint was trained with (shapes + what the file records), then overrides."""
    return _infer(_read(path, format), overrides)


def model_from_checkpoint(path: str, format: str = "auto", **overrides) -> Tuple[ViT, LoadReport]:
    """Build the model a checkpoint describes (overrides applied, e.g. img_size=384) and load it."""
    src = _read(path, format)
    model = ViT(_infer(src, overrides))
    return model, _fit(model, src, strict_shapes=True)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

def save_checkpoint(model: ViT, path: str, format: str = "vit-accel") -> str:
    """Write ``model`` in one of FORMATS (hf: a directory); returns the path written."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if format not in FORMATS:
        raise CheckpointError("unknown checkpoint format %r; choose one of: %s" % (format, ", ".join(FORMATS)))
    cfg = model.cfg
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format in ("hf", "mmcls") and cfg.global_pool != "token":
        raise CheckpointError("%s ViTs classify the class token; a global_pool=%r model has no equivalent"
                              % (format, cfg.global_pool))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if format == "timm":
        if path.endswith(".safetensors"):
            save_file(sd, path, metadata={"format": "pt"})
        else:
            torch.save(sd, path)
    elif format == "vit-accel":
        save_file(sd, path, metadata={"format": "vit-accel", "vit_config": json.dumps(cfg.to_dict())})
    elif format == "mmcls":
        meta = {"converted_by": "vit-accel", "vit_config": cfg.to_dict()}
        torch.save({"meta": meta, "state_dict": _rename(sd, _MMCLS, to_timm=False)}, path)
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
            hf["id2label"] = {str(i): "LABEL_%d" % i for i in range(cfg.num_classes)}
            hf["label2id"] = {"LABEL_%d" % i: i for i in range(cfg.num_classes)}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        save_file(_timm_to_hf(sd, with_prefix=with_head), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
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
        model, rep = model_from_checkpoint(args.src, args.from_format, **over)
        save_checkpoint(model, args.dst, args.to_format)
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        return _cli_error("convert", e)
    print(rep)
    print("wrote %s (format %s)" % (args.dst, args.to_format))
    return 0


def inspect_checkpoint(path: str, format: str = "auto", **overrides) -> Dict[str, Any]:
    """What a checkpoint holds: format, variant, sizes, classes, parameter count."""
    src = _read(path, format)
    cfg = _infer(src, overrides)
    with torch.device("meta"):  # count parameters without allocating them
        params = ViT(cfg).num_params()
    return {"path": os.fspath(path), "format": src.format, "variant": cfg.name, "img_size": cfg.img_size,
            "patch_size": cfg.patch_size, "width": cfg.width, "depth": cfg.depth, "num_heads": cfg.num_heads,
            "num_classes": cfg.num_classes, "representation_size": cfg.representation_size,
            "layer_norm_eps": cfg.layer_norm_eps, "parameters": params}


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
            print("%-20s %s" % (k, "{:,}".format(v) if k == "parameters" else v))
    return 0


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
