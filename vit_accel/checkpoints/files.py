"""Reading checkpoint files of any supported kind into a timm-keyed state dict plus hints.

Every failure to read becomes a ``CheckpointError`` naming the path and what was expected, never
a raw traceback from deep inside torch, safetensors or numpy.
Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import InputError
from .classnames import hf_names, payload_hints
from .formats import DECODE, FORMATS, detect, hf_to_timm
from .npz import npz_to_timm
from .timm_dir import WEIGHT_FILES, timm_config, timm_hints, timm_weights

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(InputError, ValueError):
    """A file that is no usable ViT checkpoint, or does not fit the model."""


@dataclass
class Source:
    path: str
    format: str
    tensors: Dict[str, torch.Tensor]
    hints: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


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
        kinds = (torch.dtype, torch.layout, torch.memory_format)
        if module == "torch" and isinstance(getattr(torch, name, None), kinds):
            return getattr(torch, name)
        return type(name, (_Opaque,), {"__module__": "opaque." + module})


# Modules whose functions a pickle names only to run code on loading (no checkpoint stores them as
# data): a file that names one is refused outright rather than loaded with an inert stand-in.
_CODE_MODULES = frozenset(("builtins", "__builtin__", "os", "posix", "nt", "subprocess", "sys", "shutil",
                           "importlib", "runpy", "socket", "pickle", "_pickle", "code", "codeop", "ctypes",
                           "pty", "webbrowser", "multiprocessing", "marshal", "types", "functools", "operator",
                           "io", "_io", "tempfile", "platform", "signal", "urllib", "http", "asyncio"))


def _tolerant_pickle(replaced: List[str]):
    """A pickle module for torch.load whose unpickler records the globals it replaced."""

    class Recording(_TolerantUnpickler):
        def find_class(self, module, name):
            found = super().find_class(module, name)
            if isinstance(found, type) and issubclass(found, _Opaque):
                replaced.append("%s.%s" % (module, name))
            return found

    return types.SimpleNamespace(Unpickler=Recording, load=lambda f, **kw: Recording(f, **kw).load(),
                                 __name__="tolerant_pickle")


def refused_global(e: Exception) -> str:
    """The global torch's weights_only loader refused ("posix.system"), or its first line."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return m.group(1) if m else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_plain(path: str, trust: bool = False) -> Any:
    """A file of tensors and plain Python types (``torch.load(weights_only=True)``).

    Anything else is refused with the object named, before any of it is built. ``trust=True``
    is the full unpickler, which runs whatever code the file names: for files the user wrote.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            "%s: refused to unpickle %s: the file holds objects besides tensors and plain types, and loading "
            "them runs code the file names (nothing was run). A file written by an older vit-accel or another "
            "program that you trust loads with --trust-checkpoint" % (path, refused_global(e))) from None
    except Exception as e:
        raise _fail(path, "a PyTorch checkpoint", e) from e


def _fail(path: str, expected: str, e: Exception) -> CheckpointError:
    msg = (str(e).strip().splitlines() or [""])[0]
    msg = msg[: msg.find(". ", 40) + 1 or 200]  # first sentence: torch's miniz errors run on
    return CheckpointError("%s: cannot be read as %s (%s%s)"
                           % (path, expected, type(e).__name__, ": " + msg if msg else ""))


def _torch_load(path: str, replaced: Optional[List[str]] = None):
    """Tensors and plain types; objects of other classes become inert stand-ins (names in ``replaced``).

    A file naming a function that runs code (``os.system``, ``builtins.exec``...) is refused.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects besides tensors (mmengine), or no pickle at all
        first = e
    except Exception as e:
        raise _fail(path, "a PyTorch checkpoint", e) from e
    names: List[str] = []
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle(names))
    except Exception as e:  # for garbage bytes the first complaint is the clearer one
        raise _fail(path, "a PyTorch checkpoint", e if "eights only" in str(first) else first) from e
    code = sorted(set(n for n in names if n.split(".")[0] in _CODE_MODULES))
    if code:
        raise CheckpointError("%s: refused: unpickling it would call %s (code, not data); nothing was run and "
                              "no checkpoint stores such objects" % (path, ", ".join(code)))
    if replaced is not None:
        replaced.extend(sorted(set(names)))
    return obj


def load_untrusted(path: str) -> Any:
    """What a torch file holds, read as ``read`` reads it: no code runs; a file naming code is refused."""
    return _torch_load(os.fspath(path))


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


def _read_hf_dir(path: str) -> Source:
    names = [n for n in HF_WEIGHTS if os.path.isfile(os.path.join(path, n))]
    if not names:
        raise CheckpointError("%s: a directory with no weights; expected an HF transformers ViT directory holding "
                              "config.json and one of %s" % (path, ", ".join(HF_WEIGHTS)))
    weights = os.path.join(path, names[0])
    files = [weights]
    if weights.endswith(".index.json"):  # sharded: the index maps tensor -> shard file
        try:
            with open(weights) as f:
                files = [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _fail(weights, "a shard index with a weight_map", e) from e
    sd: Dict[str, torch.Tensor] = {}
    for fn in files:
        sd.update(_safetensors_load(fn)[0] if fn.endswith(".safetensors") else _unwrap(_torch_load(fn), fn))
    src = Source(path, "hf", hf_to_timm(sd))
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
                     drop_rate=hf.get("hidden_dropout_prob", 0.0),
                     attn_drop_rate=hf.get("attention_probs_dropout_prob", 0.0),
                     gelu_approximate="none" if act == "gelu" else "tanh")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        src.notes.append("warning: HF hidden_act %r is not a GELU; vit-accel computes GELU" % act)
    if isinstance(hf.get("vit_accel_config"), dict):
        src.hints["vit_config"] = hf["vit_accel_config"]
    names = hf_names(hf)
    if names:
        src.hints["class_names"] = names
    return src


def _read_timm_dir(path: str, config: Dict[str, Any]) -> Source:
    """timm's directory (config.json + weights, timm_dir.py): timm keys, hints from its config."""
    weights = timm_weights(path)
    if weights is None:
        raise CheckpointError("%s: a timm directory (config.json names architecture %r) with no weights; expected "
                              "one of %s" % (path, config.get("architecture"), ", ".join(WEIGHT_FILES)))
    sd = _safetensors_load(weights)[0] if weights.endswith(".safetensors") else _unwrap(_torch_load(weights), weights)
    return Source(path, "timm", DECODE["timm"](sd), timm_hints(config))


def _unwrap(obj, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError("%s: holds a %s, expected a dict of tensors (a state dict)" % (path, type(obj).__name__))
    for key in ("state_dict", "model", "module"):  # mmcls/timm train, engine, DeepSpeed wrappers
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError("%s: a dict with no tensors (keys: %s); expected a state dict"
                              % (path, ", ".join(map(str, list(obj)[:6]))))
    return sd


def read(path: str, format: str = "auto") -> Source:
    path = os.fspath(path)
    if format != "auto" and format not in FORMATS:
        raise CheckpointError("unknown checkpoint format %r; choose one of: auto, %s" % (format, ", ".join(FORMATS)))
    if not os.path.exists(path):
        raise CheckpointError("%s: no such file or directory" % path)
    if os.path.isdir(path):
        timm = timm_config(path)
        if format not in ("auto", "timm" if timm else "hf"):
            raise CheckpointError("%s: is a directory (%s's layout), %r expects a file"
                                  % (path, "timm" if timm else "hf", format))
        return _read_timm_dir(path, timm) if timm else _read_hf_dir(path)
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
            with open(path, "rb") as f:
                if f.read(4) != b"PK\x03\x04":
                    raise ValueError("not a zip archive")
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise _fail(path, "a numpy .npz archive", e) from e
        tensors, hints, notes = npz_to_timm(arrays)
        return Source(path, "npz", tensors, hints, notes)
    hints: Dict[str, Any] = {}
    notes: List[str] = []
    if kind == "safetensors":
        sd, meta = _safetensors_load(path)
        if meta.get("format") == "vit-accel":
            try:
                hints["vit_config"] = json.loads(meta.get("vit_config", "{}"))
            except ValueError as e:
                raise _fail(path, "a vit-accel file (its vit_config metadata is not JSON)", e) from e
            if format == "auto":
                format = "vit-accel"
    else:
        replaced: List[str] = []
        obj = _torch_load(path, replaced)
        hints.update(payload_hints(obj))  # class names and a training recipe, beside the tensors
        if isinstance(obj, dict) and obj.get("format") == "vit-accel-train" and replaced:
            raise CheckpointError("%s: refused: a vit-accel training checkpoint holds tensors and plain types "
                                  "only, this one pickles %s (not imported, nothing was run)"
                                  % (path, ", ".join(replaced)))
        if isinstance(obj, dict) and obj.get("format") == "vit-accel-train":
            hints["vit_config"] = obj.get("vit_config") or {}
            format = "vit-accel" if format == "auto" else format
            obj = obj.get("model")
        elif isinstance(obj, dict) and isinstance((obj.get("meta") or {}).get("vit_config"), dict):
            hints["vit_config"] = obj["meta"]["vit_config"]  # an mmcls file that we wrote
        sd = _unwrap(obj, path)
        if replaced:
            notes = ["objects of %s were not imported (their code did not run)" % ", ".join(replaced)]
    style = detect(sd)
    if format == "auto":
        if style is None:
            raise CheckpointError("%s: tensors do not look like a ViT of any known format (first keys: %s); "
                                  "pass format= one of %s" % (path, ", ".join(list(sd)[:5]), ", ".join(FORMATS)))
        format = style
    elif style is not None and style != {"vit-accel": "timm"}.get(format, format):
        raise CheckpointError("%s: tensor names are %s's, not %s's (first keys: %s)"
                              % (path, style, format, ", ".join(list(sd)[:3])))
    return Source(path, format, DECODE[format](sd), hints, notes)
