"""The strict unpickler: the one way a pickle from a user becomes Python objects.

A pickle is a small program: it names globals (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, the
``EXT`` codes of ``copyreg``) and calls them (``REDUCE``, ``OBJ``, ``INST``, ``NEWOBJ``,
``NEWOBJ_EX``, ``BUILD`` through ``__setstate__``), and hands ids to ``persistent_load``.
Here every one of those ways is decided by a table, not by importing:

* a global is an exact ``(module, name)`` pair of ``ALLOWED`` (the constructors of data:
  tensors, containers, numpy arrays, scalars and dtypes) or of a stand-in table; a name with a
  dot, a module prefix, anything else is refused, naming it. Nothing is imported and no attribute
  is looked up on a module, so ``torch._utils`` + ``torch.serialization.os.system`` reaches nothing.
* a stand-in is an inert ``StandIn`` (a dict that also keeps list items, constructor arguments
  and state) for an exact pair of ``FOREIGN_OBJECTS``: classes mmengine, mmcls/mmcv and timm's
  training scripts put in their checkpoints' meta. No code of the original class exists here.
* only table callables and stand-in classes may be called; ``BUILD`` sets state only on
  stand-ins, numpy arrays and dtypes, and plain attributes (never one the class defines) of an
  ``OrderedDict``; ``SETITEM``/``APPEND`` only fill dicts, lists and stand-ins.
* a persistent id must be one of torch's storage tuples; ``EXT`` codes resolve through the same
  table on every load (``copyreg``'s process-wide cache of resolved objects is never used).

``pickle_module()`` is what ``torch.load(..., pickle_module=...)`` takes: torch reads its zip
(or legacy) container and storages, this reads the pickle. It is the pure-Python unpickler with
its dispatch table edited, so every opcode above goes through this module.

Python 3.8 / torch 2.0 compatible (the IPU path reads checkpoints through it).
"""
from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import pickle
import struct
import types
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple

import numpy as np
import torch

try:  # numpy >= 2 pickles as numpy._core; numpy 1.x as numpy.core
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x (the torch 2.0 environment)
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric

Pair = Tuple[str, str]


class Refused(pickle.UnpicklingError):
    """The pickle asks for something the strict unpickler does not do; ``what`` names it."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


# ---------------------------------------------------------------------------------------
# Stand-ins: objects of foreign classes, kept as data
# ---------------------------------------------------------------------------------------

class StandIn(dict):
    """An object of a class that is never imported (``standin_of`` names it).

    It keeps what the pickle gives it: dict items, list items (``listed``), constructor
    arguments (``args``, ``kwargs``) and the ``BUILD`` state (``state``). None of the original
    class's methods exist here, so none can run.
    """

    __slots__ = ("args", "kwargs", "state", "listed")
    standin_of = ""

    def __new__(cls, *args, **kwargs):
        self = dict.__new__(cls)
        self.args, self.kwargs, self.state, self.listed = args, kwargs, None, []
        if len(args) == 1 and isinstance(args[0], dict):   # a dict subclass built from its items
            dict.update(self, args[0])
        return self

    def __init__(self, *args, **kwargs):  # dict.__init__ would take the arguments as items
        pass

    def __setstate__(self, state):
        self.state = state

    def append(self, item) -> None:
        self.listed.append(item)

    def extend(self, items) -> None:
        self.listed.extend(items)

    def __repr__(self) -> str:
        return "<%s (not imported) %s>" % (self.standin_of, dict.__repr__(self))


def _is_standin_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, StandIn) and obj is not StandIn


def _standin_class(module: str, name: str) -> type:
    return type(name, (StandIn,), {"__slots__": (), "__module__": "opaque." + module, "__qualname__": name,
                                   "standin_of": "%s.%s" % (module, name)})


def _standin_attribute(owner: Any, name: Any) -> type:
    """``getattr`` as a pickle may call it (mmengine's HistoryBuffer names its own methods so):
    allowed on a stand-in class only, where it gives another stand-in."""
    if not _is_standin_class(owner) or not isinstance(name, str):
        raise Refused("getattr(%s, %r)" % (_describe(owner), name))
    module, _, qual = owner.standin_of.rpartition(".")
    return _standin_class(module, "%s.%s" % (qual, name))


# mmengine (message_hub), mmcv/mmengine configs, addict, and timm/DeiT/MAE training scripts'
# ``args``: the classes real checkpoints of those sources carry in their meta.
FOREIGN_OBJECTS: FrozenSet[Pair] = frozenset([
    ("mmengine.logging.history_buffer", "HistoryBuffer"),
    ("mmengine.config.config", "ConfigDict"),
    ("mmcv.utils.config", "ConfigDict"),
    ("addict.addict", "Dict"),
    ("argparse", "Namespace"),
])


# ---------------------------------------------------------------------------------------
# The table of real objects
# ---------------------------------------------------------------------------------------

def _plain_attrs(obj: Any, state: Any) -> Any:
    """Set ``state`` (a dict, or pickle's (dict, slots) pair) as attributes of ``obj``: names that
    its class does not define only, so no method, property or dunder is replaced."""
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, dict):
            raise Refused("state of type %s for a %s" % (type(part).__name__, type(obj).__name__))
        for k, v in part.items():
            if not isinstance(k, str) or k.startswith("__") or hasattr(type(obj), k):
                raise Refused("setting attribute %r of a %s (its class defines it)" % (k, type(obj).__name__))
            setattr(obj, k, v)
    return obj


# torch's tensor rebuild functions, with the backward hooks a file may name dropped: torch.save
# writes an empty OrderedDict there, and a hook would be called during backward.
def _rebuild_tensor(storage, storage_offset, size, stride):
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _plain_attrs(torch.nn.Parameter(data, requires_grad), state)


_TENSOR_REBUILDS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                    _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
    """A tensor with Python attributes (DeepSpeed's ZeRO-3 partitions carry ``ds_id``)."""
    if not any(func is f for f in _TENSOR_REBUILDS) or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise Refused("_rebuild_from_type_v2 of %s as %s" % (_describe(func), _describe(new_type)))
    ret = func(*args)
    if type(ret) is not new_type:
        ret = ret.as_subclass(new_type)
    return _plain_attrs(ret, state)


def _encode(text, encoding="utf-8"):
    """``_codecs.encode`` as pickle protocol 2 writes bytes: str + latin1 (no codec lookup by name)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise Refused("_codecs.encode(%s, %r)" % (type(text).__name__, encoding))
    return text.encode(encoding)


def _bytearray(data=b""):
    if not isinstance(data, (bytes, bytearray)):
        raise Refused("bytearray(%s)" % type(data).__name__)
    return bytearray(data)


def _np_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray or not isinstance(dtype, bytes):
        raise Refused("numpy _reconstruct of %s" % _describe(subtype))
    return _np_multiarray._reconstruct(subtype, shape, dtype)


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str) or not isinstance(align, bool) or not isinstance(copy, bool):
        raise Refused("numpy dtype(%s)" % type(spec).__name__)
    return np.dtype(spec, align, copy)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise Refused("numpy scalar of %s" % dtype)
    return _np_multiarray.scalar(dtype, data)


def _np_frombuffer(buf, dtype, shape, order):
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise Refused("numpy _frombuffer of %s" % type(buf).__name__)
    return _np_numeric._frombuffer(buf, dtype, shape, order)


def _allowed() -> Tuple[Dict[Pair, Any], Tuple[Any, ...], Tuple[type, ...]]:
    """(every pair -> object, the objects a pickle may call, the classes NEWOBJ may create)."""
    containers = (collections.OrderedDict, collections.defaultdict, collections.Counter)
    plain = (set, frozenset, complex, slice, range, list, dict, tuple, int, float, str, bool)
    callables: Dict[Pair, Any] = {("collections", c.__name__): c for c in containers}
    callables.update({("builtins", t.__name__): t for t in plain})
    callables.update({("builtins", "bytearray"): _bytearray, ("builtins", "getattr"): _standin_attribute,
                      ("_codecs", "encode"): _encode,
                      ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
                      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
                      ("torch.serialization", "_get_layout"): torch.serialization._get_layout})
    for f in _TENSOR_REBUILDS:
        if hasattr(torch._utils, f.__name__):   # v3 is newer than torch 2.0
            callables[("torch._utils", f.__name__)] = f
    for core in ("numpy.core", "numpy._core"):
        callables.update({(core + ".multiarray", "_reconstruct"): _np_reconstruct,
                          (core + ".multiarray", "scalar"): _np_scalar,
                          (core + ".numeric", "_frombuffer"): _np_frombuffer})
    callables[("numpy", "dtype")] = _np_dtype
    values: Dict[Pair, Any] = {("numpy", "ndarray"): np.ndarray, ("torch", "Tensor"): torch.Tensor,
                               ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
                               ("torch", "UntypedStorage"): torch.UntypedStorage}
    kinds = (torch.dtype, torch.layout, torch.memory_format)
    values.update({("torch", n): v for n, v in sorted(vars(torch).items()) if isinstance(v, kinds)})
    values.update(callables)
    return values, tuple(callables.values()), containers + plain


ALLOWED, _CALLABLE, _NEWABLE = _allowed()


def _describe(obj: Any) -> str:
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return getattr(obj, "standin_of", "") or "%s.%s" % (obj.__module__, obj.__qualname__)
    return "a %s object" % type(obj).__name__


# ---------------------------------------------------------------------------------------
# The unpickler
# ---------------------------------------------------------------------------------------

def _py3_name(module: str, name: str) -> Pair:
    """Protocol 2 writes Python 2 names (``__builtin__.set``): the stdlib's fixed rename table."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _is_storage_id(pid: Any) -> bool:
    """torch's persistent ids: ('storage', type, key, location, numel[, view metadata])."""
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
        return False
    kind = pid[1]
    return (kind is torch.UntypedStorage or isinstance(kind, torch.serialization.StorageType)) and \
        isinstance(pid[2], str) and isinstance(pid[3], (str, bytes)) and type(pid[4]) is int


class StrictUnpickler(pickle._Unpickler):
    """``pickle``'s pure-Python unpickler with every opcode that reaches code replaced (see the module)."""

    standins: FrozenSet[Pair] = FOREIGN_OBJECTS

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self.replaced: List[str] = []        # stand-in names, in the order met
        self._made: Dict[Pair, type] = {}

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise Refused("a global named by %s" % type(name).__name__)
        key = _py3_name(module, name)
        if key in self.standins:
            if key not in self._made:
                self._made[key] = _standin_class(*key)
                self.replaced.append("%s.%s" % key)
            return self._made[key]
        if key not in ALLOWED:
            raise Refused("%s.%s" % key)
        return ALLOWED[key]

    # -- calls ---------------------------------------------------------------------------
    @staticmethod
    def _check_call(func: Any, how: str) -> None:
        if not (any(func is c for c in _CALLABLE) or _is_standin_class(func)):
            raise Refused("%s of %s" % (how, _describe(func)))

    def _instantiate(self, klass, args):          # INST and OBJ
        self._check_call(klass, "INST/OBJ")
        super()._instantiate(klass, args)

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_call(func, "REDUCE")
        self.stack[-1] = func(*args)

    def _new(self, cls, args, kwargs) -> None:
        if not (_is_standin_class(cls) or any(cls is c for c in _NEWABLE)):
            raise Refused("NEWOBJ of %s" % _describe(cls))
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._new(cls, args, {})

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._new(cls, args, kwargs)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, StandIn) or type(inst) is np.ndarray or isinstance(inst, np.dtype):
            inst.__setstate__(state)
        elif type(inst) in (collections.OrderedDict, collections.Counter):
            _plain_attrs(inst, state)          # torch's state dicts carry `_metadata`
        else:
            raise Refused("BUILD (__setstate__) of %s" % _describe(inst))

    # -- ids -----------------------------------------------------------------------------
    def load_persid(self):
        raise Refused("a persistent id %r (torch's storages are BINPERSID tuples)"
                      % self.readline()[:-1].decode("ascii", "replace"))

    def load_binpersid(self):
        pid = self.stack.pop()
        if not _is_storage_id(pid):
            raise Refused("a persistent id %s that is not one of torch's storages"
                          % (repr(pid)[:120] if isinstance(pid, (tuple, str, bytes, int)) else _describe(pid)))
        self.append(self.persistent_load(pid))

    def _extension(self, code: int) -> None:
        key = copyreg._inverted_registry.get(code)
        if not key:
            raise Refused("extension code %d (not registered)" % code)
        self.append(self.find_class(*key))

    def load_ext1(self):
        self._extension(self.read(1)[0])

    def load_ext2(self):
        self._extension(struct.unpack("<H", self.read(2))[0])

    def load_ext4(self):
        self._extension(struct.unpack("<i", self.read(4))[0])

    # -- filling containers --------------------------------------------------------------
    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        if not isinstance(self.stack[-1], dict):
            raise Refused("SETITEM into %s" % _describe(self.stack[-1]))
        self.stack[-1][key] = value

    def load_setitems(self):
        items = self.pop_mark()
        if not isinstance(self.stack[-1], dict):
            raise Refused("SETITEMS into %s" % _describe(self.stack[-1]))
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_appends(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if not (type(target) is list or isinstance(target, StandIn)):
            raise Refused("APPENDS into %s" % _describe(target))
        target.extend(items)

    def load_append(self):
        item = self.stack.pop()
        target = self.stack[-1]
        if not (type(target) is list or isinstance(target, StandIn)):
            raise Refused("APPEND into %s" % _describe(target))
        target.append(item)

    def load_additems(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not set:
            raise Refused("ADDITEMS into %s" % _describe(self.stack[-1]))
        self.stack[-1].update(items)

    dispatch = dict(pickle._Unpickler.dispatch)
    for _op, _fn in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj), (pickle.NEWOBJ_EX, load_newobj_ex),
                     (pickle.BUILD, load_build), (pickle.PERSID, load_persid), (pickle.BINPERSID, load_binpersid),
                     (pickle.EXT1, load_ext1), (pickle.EXT2, load_ext2), (pickle.EXT4, load_ext4),
                     (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                     (pickle.APPEND, load_append), (pickle.APPENDS, load_appends), (pickle.ADDITEMS, load_additems)):
        dispatch[_op[0]] = _fn
    del _op, _fn


def pickle_module(standins: Iterable[Pair] = FOREIGN_OBJECTS, replaced: Optional[List[str]] = None):
    """A module for ``torch.load(pickle_module=...)``: its unpickler is ``StrictUnpickler`` with
    ``standins`` as the stand-in table; the stand-in names it meets are appended to ``replaced``."""
    table = frozenset(standins)
    seen = replaced if replaced is not None else []

    class Unpickler(StrictUnpickler):
        standins = table

        def load(self):
            try:
                return super().load()
            finally:
                seen.extend(n for n in self.replaced if n not in seen)

    return types.SimpleNamespace(Unpickler=Unpickler, load=lambda f, **kw: Unpickler(f, **kw).load(),
                                 __name__="vit_accel_strict_pickle")
