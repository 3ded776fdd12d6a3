"""Pickles that try to run code, and benign foreign checkpoints, for tests/test_trust.py.

A payload is the opcodes of one object (no PROTO, no STOP). ``torch_checkpoint`` puts it in the
``meta`` of a real ``torch.save`` file (zip, or the legacy format) beside a state dict, as a
malicious checkpoint would carry it. Payloads reach a global every way the pickle machine allows
(GLOBAL, STACK_GLOBAL with dotted names, INST, OBJ, NEWOBJ, NEWOBJ_EX, BUILD through
``__setstate__``, EXT1/2/4 through copyreg, persistent ids), for targets under every module the
strict unpickler's tables touch and under others. A *live* payload creates its marker file when
the file is read with the full unpickler (the test checks that premise); every payload must be
refused by vit-accel's readers, naming ``expect``.

Python 3.8 compatible (the torch 2.0 environment runs these tests too).
"""
from __future__ import annotations

import collections
import contextlib
import copyreg
import importlib
import io
import json
import os
import pickle
import struct
import sys
import types
import warnings
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------
# What a payload calls when it gets through: each creates the file it is given
# ---------------------------------------------------------------------------------------

def touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("ran")


class Gadget:
    """A class whose construction and ``__setstate__`` create a file (NEWOBJ, NEWOBJ_EX, BUILD)."""

    def __new__(cls, marker=None, **kwargs):
        marker = marker or kwargs.get("marker")
        if marker:
            touch(marker)
        return object.__new__(cls)

    def __setstate__(self, state):
        touch(state["marker"])


# ---------------------------------------------------------------------------------------
# Opcodes
# ---------------------------------------------------------------------------------------

def text(s: str) -> bytes:
    b = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def glob(module: str, name: str) -> bytes:
    return pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    return text(module) + text(name) + pickle.STACK_GLOBAL


def tup(*parts: bytes) -> bytes:
    return pickle.MARK + b"".join(parts) + pickle.TUPLE


def dict_of(**items: bytes) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(text(k) + v for k, v in items.items()) + pickle.SETITEMS


def call(callee: bytes, *args: bytes) -> bytes:
    return callee + tup(*args) + pickle.REDUCE


def ext(code: int) -> bytes:
    if code < 256:
        return pickle.EXT1 + bytes([code])
    if code < 65536:
        return pickle.EXT2 + struct.pack("<H", code)
    return pickle.EXT4 + struct.pack("<i", code)


# ---------------------------------------------------------------------------------------
# Targets and payloads
# ---------------------------------------------------------------------------------------

class Target(NamedTuple):
    module: str
    name: str
    kind: str            # "shell", "python", "path" (a function of one string), "class" (Gadget), "none"


class Payload(NamedTuple):
    name: str
    ops: bytes
    expect: str          # what a refusal must name
    live: FrozenSet[str]  # containers ("zip", "legacy") where the full unpickler runs it
    proto: int = 2


# The modules of the strict unpickler's tables (vit_accel/checkpoints/unpickle.py, backends/zero.py).
TABLE_MODULES = ("builtins", "collections", "_codecs", "torch", "torch._utils", "torch._tensor", "torch.serialization",
                 "torch.nn.parameter", "numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                 "numpy.core.numeric", "numpy._core.numeric", "argparse", "addict.addict",
                 "mmengine.logging.history_buffer", "mmengine.config.config", "mmcv.utils.config",
                 "deepspeed.runtime.fp16.loss_scaler", "deepspeed.runtime.zero.config",
                 "deepspeed.utils.tensor_fragment")
_WALKABLE = ("builtins", "collections", "_codecs", "torch", "numpy", "argparse")  # imported anyway; cheap


def _path_to_system(module: str) -> Optional[str]:
    """A dotted attribute path from ``module`` to os.system through modules (what a protocol-4
    unpickler walks), or None; only for modules that are cheap to import here."""
    if module.split(".")[0] not in _WALKABLE:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            root = importlib.import_module(module)
        except ImportError:
            return None
    queue, seen = collections.deque([(root, "")]), {id(root)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while queue:
            mod, path = queue.popleft()
            for k, v in sorted(vars(mod).items()):
                if v is os.system:
                    return (path + "." + k).lstrip(".")
                if isinstance(v, types.ModuleType) and id(v) not in seen and path.count(".") < 4:
                    seen.add(id(v))
                    queue.append((v, path + "." + k))
    return None


def targets() -> List[Target]:
    out = [Target("os", "system", "shell"), Target("posix", "system", "shell"),
           Target("subprocess", "getoutput", "shell"), Target("builtins", "exec", "python"),
           Target("builtins", "eval", "python"), Target("__builtin__", "eval", "python"),
           Target("trust_payloads", "touch", "path"), Target("trust_payloads", "Gadget", "class")]
    for module in TABLE_MODULES:
        path = _path_to_system(module)
        out += [Target(module, path, "shell")] if path else [Target(module, "system", "none"),
                                                              Target(module, "os.system", "none")]
    # attribute walks that start at a name the tables do allow
    out += [Target("torch._utils", "_rebuild_tensor_v2.__globals__", "none"),
            Target("collections", "OrderedDict.__class__", "none"), Target("builtins", "getattr.__self__", "none"),
            Target("numpy", "dtype.__init__", "none")]
    return out


def _py3(module: str, name: str) -> str:
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return "%s.%s" % _compat_pickle.NAME_MAPPING[(module, name)]
    return "%s.%s" % (_compat_pickle.IMPORT_MAPPING.get(module, module), name)


def extension_codes(ts: List[Target]) -> Dict[int, Tuple[str, str]]:
    """One copyreg extension code per target; the widths (EXT1, EXT2, EXT4) take turns."""
    return {(10 + i, 1000 + i, 70000 + i)[i % 3]: (t.module, t.name) for i, t in enumerate(ts)}


def register_extensions(codes: Dict[int, Tuple[str, str]]) -> None:
    for code, (module, name) in codes.items():
        copyreg.add_extension(module, name, int(code))


def unregister_extensions(codes: Dict[int, Tuple[str, str]]) -> None:
    for code, (module, name) in codes.items():
        copyreg.remove_extension(module, name, int(code))


def payloads(marker_dir: str) -> List[Payload]:
    """Every target reached every way that fits it, plus attacks through allowed objects."""
    ts = targets()
    codes = {v: k for k, v in extension_codes(ts).items()}
    out: List[Payload] = []

    def add(name: str, ops_for, expect: str, live=("zip", "legacy"), proto: int = 2) -> None:
        marker = os.path.join(marker_dir, name)
        out.append(Payload(name, ops_for(text(marker), marker), expect, frozenset(live), proto))

    for i, t in enumerate(ts):
        tag = "%02d-%s-%s" % (i, t.module, t.name.replace(".", "_"))
        proto = 4 if "." in t.name else 2        # the full unpickler walks dotted names from protocol 4
        live = ("zip", "legacy") if t.kind != "none" else ()
        expect = _py3(t.module, t.name)

        def arg(m: bytes, marker: str, kind: str = t.kind) -> bytes:
            if kind == "shell":
                return text("touch %s" % marker)
            if kind == "python":
                return text("open(%r, 'w').close()" % marker)
            return m

        g = glob(t.module, t.name)
        add(tag + "-GLOBAL", lambda m, k, g=g, a=arg: call(g, a(m, k)), expect, live, proto)
        add(tag + "-STACK_GLOBAL", lambda m, k, t=t, a=arg: call(stack_glob(t.module, t.name), a(m, k)), expect,
            live, proto)
        add(tag + "-INST", lambda m, k, t=t, a=arg: pickle.MARK + a(m, k) + pickle.INST + t.module.encode()
            + b"\n" + t.name.encode() + b"\n", expect, live, proto)
        add(tag + "-OBJ", lambda m, k, g=g, a=arg: pickle.MARK + g + a(m, k) + pickle.OBJ, expect, live, proto)
        add(tag + "-EXT", lambda m, k, c=codes[(t.module, t.name)], a=arg: call(ext(c), a(m, k)), expect, live, proto)
        if t.kind == "class":
            add(tag + "-NEWOBJ", lambda m, k, g=g: g + tup(m) + pickle.NEWOBJ, expect, live, proto)
            add(tag + "-NEWOBJ_EX", lambda m, k, g=g: g + tup() + dict_of(marker=m) + pickle.NEWOBJ_EX, expect,
                live, proto)
            add(tag + "-BUILD", lambda m, k, g=g: g + tup() + pickle.NEWOBJ + dict_of(marker=m) + pickle.BUILD,
                expect, live, proto)
        if t.kind in ("path", "none"):   # torch's legacy loader returns what a ('module', ...) id names
            add(tag + "-PERSID", lambda m, k, g=g: call(tup(text("module"), g, text(""), text("")) + pickle.BINPERSID,
                                                        m), expect, ("legacy",) if t.kind == "path" else (), proto)

    # through what the tables allow: each refused at the step that would reach further
    layout = glob("torch.serialization", "_get_layout")
    getattr_ = glob("builtins", "getattr")

    def chain(m: bytes, marker: str) -> bytes:   # _get_layout.__globals__.get("os").system("touch ...")
        module_globals = call(getattr_, layout, text("__globals__"))
        os_module = call(call(getattr_, module_globals, text("get")), text("os"))
        return call(call(getattr_, os_module, text("system")), text("touch %s" % marker))

    add("getattr-chain", chain, "getattr(torch.serialization._get_layout, '__globals__')")
    add("rebuild_from_type-getattr", lambda m, k: call(glob("torch._tensor", "_rebuild_from_type_v2"), getattr_,
                                                       glob("torch", "Tensor"), tup(layout, text("__globals__")),
                                                       pickle.EMPTY_DICT), "_rebuild_from_type_v2 of", ())
    add("build-ordereddict-method", lambda m, k: call(glob("collections", "OrderedDict")) + dict_of(
        keys=glob("collections", "OrderedDict")) + pickle.BUILD, "setting attribute 'keys'", ())
    add("build-function-state", lambda m, k: layout + tup(pickle.NONE, dict_of(__defaults__=tup(m)))
        + pickle.BUILD, "BUILD (__setstate__) of torch.serialization._get_layout", ())
    add("setitem-into-size", lambda m, k: call(glob("torch", "Size"), tup()) + m + m + pickle.SETITEM,
        "SETITEM into a Size object", ())
    add("numpy-subtype", lambda m, k: call(glob("numpy.core.multiarray", "_reconstruct"), glob("torch", "Tensor"),
                                           tup(), pickle.SHORT_BINBYTES + b"\x01b"), "numpy _reconstruct of", ())
    add("codecs-by-name", lambda m, k: call(glob("_codecs", "encode"), m, text("rot13")), "_codecs.encode", ())
    add("persid-module-allowed", lambda m, k: tup(text("module"), glob("collections", "OrderedDict"), text(""),
                                                  text("")) + pickle.BINPERSID, "persistent id", ())
    add("persid-text", lambda m, k: pickle.PERSID + b"0\n", "persistent id", ())
    add("ext-unregistered", lambda m, k: ext(65000), "extension code 65000", ())
    return out


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

def _splicing_pickle_module(ops: bytes, proto: int):
    """A pickle module for torch.save: the real pickle of the object, then ``meta`` = ``ops`` set in it."""

    class Pickler(pickle.Pickler):
        def __init__(self, file, protocol=2, **kwargs):
            super().__init__(io.BytesIO(), protocol)
            self._out = file

        def dump(self, obj):
            buf = io.BytesIO()
            inner = pickle.Pickler(buf, protocol=2)
            inner.persistent_id = self.persistent_id      # torch's: storages go to the file
            inner.dump(obj)
            data = buf.getvalue()
            assert data[:2] == b"\x80\x02" and data[-1:] == pickle.STOP
            self._out.write(b"\x80" + bytes([proto]) + data[2:-1] + text("meta") + ops + pickle.SETITEM + pickle.STOP)

    return types.SimpleNamespace(Pickler=Pickler, dump=pickle.dump, __name__="splicing_pickle")


def small_state_dict() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"head.weight": torch.randn(3, 4, generator=g), "head.bias": torch.zeros(3)}


def torch_checkpoint(path: str, payload: Payload, legacy: bool = False, obj=None) -> str:
    """A real torch.save file of ``obj`` (a state dict by default) whose ``meta`` is the payload."""
    obj = {"state_dict": small_state_dict()} if obj is None else obj
    torch.save(obj, path, pickle_module=_splicing_pickle_module(payload.ops, payload.proto),
               _use_new_zipfile_serialization=not legacy)
    return path


# ---------------------------------------------------------------------------------------
# Benign foreign checkpoints: the objects mmengine, mmcv and timm files carry
# ---------------------------------------------------------------------------------------

class HistoryBuffer:
    """mmengine.logging.history_buffer.HistoryBuffer as it pickles: numpy histories, and its own
    methods in a dict, which protocol 2 writes as ``getattr(HistoryBuffer, "min")``."""

    def __init__(self):
        self._log_history = np.array([0.5, 0.25])
        self._count_history = np.array([1, 1])
        self.max_length = 1000000
        self._statistics_methods = {"min": HistoryBuffer.min, "mean": HistoryBuffer.mean}

    def min(self):
        return self._log_history.min()

    def mean(self):
        return self._log_history.mean()


class MMEngineConfigDict(dict):
    """mmengine.config.config.ConfigDict: reduces to its class and a plain dict of its items."""

    def __reduce_ex__(self, proto):
        return self.__class__, (dict(self),), None, None, None


class AddictDict(dict):
    """addict.addict.Dict (and mmcv 1.x's ConfigDict, a subclass): its state is itself."""

    def __getstate__(self):
        return self

    def __setstate__(self, state):
        self.update(state)


class MMCVConfigDict(AddictDict):
    pass


_FOREIGN_HOMES = {HistoryBuffer: ("mmengine.logging.history_buffer", "HistoryBuffer"),
                  MMEngineConfigDict: ("mmengine.config.config", "ConfigDict"),
                  AddictDict: ("addict.addict", "Dict"), MMCVConfigDict: ("mmcv.utils.config", "ConfigDict")}


@contextlib.contextmanager
def foreign_classes():
    """The replicas above, importable under their real names while a file is written."""
    saved = {}
    try:
        for cls, (module, name) in _FOREIGN_HOMES.items():
            for i in range(1, module.count(".") + 2):
                part = ".".join(module.split(".")[:i])
                saved.setdefault(part, sys.modules.get(part))
                if not isinstance(sys.modules.get(part), _Home):
                    sys.modules[part] = _Home(part)
            setattr(sys.modules[module], name, cls)
            cls.__module__, cls.__qualname__ = module, name
            for fn in vars(cls).values():
                if isinstance(fn, types.FunctionType):
                    fn.__module__, fn.__qualname__ = module, name + "." + fn.__name__
        yield
    finally:
        for part, mod in saved.items():
            if mod is None:
                sys.modules.pop(part, None)
            else:
                sys.modules[part] = mod


class _Home(types.ModuleType):
    pass


def foreign_meta():
    """Meta as mmengine / mmcls / timm training scripts write it (without tensors)."""
    import argparse

    hub = {"log_scalars": collections.OrderedDict(loss=HistoryBuffer()),
           "runtime_info": collections.OrderedDict(iter=3, epoch=1), "resumed_keys": collections.OrderedDict(iter=True)}
    return {"meta": {"epoch": 3, "seed": np.int64(7), "best_top1": np.float64(81.5), "lr": np.float32(0.1),
                     "flag": np.bool_(True), "dtype": np.dtype("float32"), "np_rng": np.random.RandomState(1).get_state(),
                     "hist": np.arange(6, dtype=np.float16).reshape(2, 3),
                     "cfg": MMEngineConfigDict(model=dict(type="VisionTransformer"), lr=0.1),
                     "mmcv_cfg": MMCVConfigDict(optimizer=AddictDict(type="SGD"), layers=[1, 2]),
                     "CLASSES": ("cat", "dog"), "by_class": collections.defaultdict(list, cat=[1, 2]),
                     "counts": collections.defaultdict(int, dog=3), "nested": collections.defaultdict(dict),
                     "order": collections.OrderedDict(a=1), "tags": {"x", "y"}, "frozen": frozenset([1]),
                     "c": complex(1, 2), "raw": b"\x00\x01", "buf": bytearray(b"ab"), "span": slice(1, 5),
                     "when": range(3)},
            "message_hub": hub, "args": argparse.Namespace(model="vit_base_patch16_224", lr=0.001, output="runs")}


def write_foreign(path: str, state_dict, legacy: bool = False) -> str:
    with foreign_classes():
        obj = dict(foreign_meta(), state_dict=state_dict)
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def save_codes(path: str, codes: Dict[int, Tuple[str, str]]) -> None:
    with open(path, "w") as f:
        json.dump({str(k): list(v) for k, v in codes.items()}, f)


def load_codes(path: str) -> Dict[int, Tuple[str, str]]:
    with open(path) as f:
        return {int(k): (v[0], v[1]) for k, v in json.load(f).items()}
