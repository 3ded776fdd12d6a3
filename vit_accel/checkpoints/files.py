"""Reading checkpoint files of any supported kind into a timm-keyed state dict plus hints.

Every failure to read becomes a ``CheckpointError`` naming the path and what was expected, never
a raw traceback from deep inside torch, safetensors or numpy. Every torch (pickle) file goes
through ``load_torch`` and so through the strict unpickler of ``unpickle.py``; the full unpickler
is reached only by ``load_plain(trust=True)`` (``train --trust-checkpoint``).
Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ..errors import InputError
from .classnames import hf_names, payload_hints
from .formats import DECODE, FORMATS, detect, hf_to_timm
from .npz import npz_to_timm
from .timm_dir import WEIGHT_FILES, timm_config, timm_hints, timm_weights
from .unpickle import FOREIGN_OBJECTS, Refused, pickle_module

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


# What a refusal tells a user to do with a file they trust; the flag exists for resuming only.
_TRUSTED_ELSEWHERE = ("if you trust the classes the file names, load it in your own code with torch.load(path, "
                      "weights_only=True) after allowing exactly those classes "
                      "(torch.serialization.add_safe_globals), save its state dict with torch.save or safetensors, "
                      "then pass that file")
_TRUSTED_RESUME = ("a training checkpoint you wrote yourself with an older vit-accel resumes with --trust-checkpoint, "
                   "which reads it with the full unpickler and so runs whatever code it names")


def refused_global(e: Exception) -> str:
    """The global torch's weights_only loader refused ("posix.system"), or its first line."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return m.group(1) if m else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _container_refusal(path: str) -> Optional[str]:
    """Why torch.load would run more than a pickle on this file (TorchScript, the old tar format), or None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == b"PK\x03\x04":
        try:
            records = torch._C.PyTorchFileReader(path).get_all_records()
        except RuntimeError:
            return None                    # not torch's zip: torch.load says what it is
        if "constants.pkl" in records:      # how torch.load recognizes TorchScript (it then calls torch.jit.load)
            return ("a TorchScript archive: loading one runs the code it holds; export its weights where you trust "
                    "it (torch.jit.load(path).state_dict(), saved with torch.save or safetensors)")
    elif head[257:262] == b"ustar":        # torch < 0.4's tar container, unpacked by torch.load
        return "a torch file of the pre-0.4 tar format, which is not read here; re-save it with a current torch"
    return None


def load_torch(path: str, standins: Iterable[Tuple[str, str]] = FOREIGN_OBJECTS,
               replaced: Optional[List[str]] = None, map_location: Any = "cpu", hint: str = _TRUSTED_ELSEWHERE) -> Any:
    """A torch file, its pickle read by the strict unpickler (``unpickle.py``): tensors, containers,
    numpy arrays, scalars and dtypes, and inert stand-ins for the classes in ``standins`` (their
    names are appended to ``replaced``). Anything else is refused before it is built, naming it;
    nothing the file names is imported or run. Every reader of a user's torch file comes here.
    """
    path = os.fspath(path)
    why = _container_refusal(path)
    if why:
        raise CheckpointError("%s: refused: %s" % (path, why))
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        try:  # torch then refuses any pickle_module; its own loader is stricter still (no numpy)
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError("%s: refused to unpickle %s (TORCH_FORCE_WEIGHTS_ONLY_LOAD is set; nothing was "
                                  "run)" % (path, refused_global(e))) from None
        except Exception as e:
            raise _fail(path, "a PyTorch checkpoint", e) from e
    try:
        strict = pickle_module(standins, replaced)
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=strict)
    except Refused as e:
        raise CheckpointError("%s: refused: its pickle asks for %s, which the checkpoint reader does not build "
                              "(it builds tensors, containers, numpy arrays, scalars and dtypes, and inert stand-ins "
                              "for the meta objects of mmengine, mmcv and timm files); nothing was imported or run. %s"
                              % (path, e.what, hint[:1].upper() + hint[1:])) from None
    except Exception as e:
        raise _fail(path, "a PyTorch checkpoint", e) from e


def load_plain(path: str, trust: bool = False) -> Any:
    """A file vit-accel wrote (training checkpoints): the strict reader without stand-ins.

    ``trust=True`` (``--trust-checkpoint``) is the full unpickler, which runs whatever code the
    file names: for a file the user wrote.
    """
    path = os.fspath(path)
    if trust:  # the one full unpickler in vit-accel, reached only through --trust-checkpoint
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle)
        except Exception as e:
            raise _fail(path, "a PyTorch checkpoint", e) from e
    return load_torch(path, standins=(), hint=_TRUSTED_RESUME)


def _fail(path: str, expected: str, e: Exception) -> CheckpointError:
    msg = (str(e).strip().splitlines() or [""])[0]
    msg = msg[: msg.find(". ", 40) + 1 or 200]  # first sentence: torch's miniz errors run on
    return CheckpointError("%s: cannot be read as %s (%s%s)"
                           % (path, expected, type(e).__name__, ": " + msg if msg else ""))


def load_untrusted(path: str) -> Any:
    """What a torch file holds, read as ``read`` reads it (foreign meta objects become stand-ins)."""
    return load_torch(os.fspath(path))


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
        sd.update(_safetensors_load(fn)[0] if fn.endswith(".safetensors") else _unwrap(load_torch(fn), fn))
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
    sd = _safetensors_load(weights)[0] if weights.endswith(".safetensors") else _unwrap(load_torch(weights), weights)
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
        obj = load_torch(path, replaced=replaced)
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
            notes = ["objects of %s were kept as inert data (their classes were not imported)" % ", ".join(replaced)]
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
