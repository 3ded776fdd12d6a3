"""Operation coverage of the IPU path against PopTorch 3.4's supported operations.

Every aten operation that the IPU-configured model dispatches is recorded, with the module
that emitted it, and checked against tests/poptorch_supported_ops.txt (PopTorch's
docs/user_guide/supported_ops.rst on sdk-release-3.4; source and commit in its header):
the vit-b16-ft training step (fp16 model and inputs, BeginBlock stages and recompute
checkpoints, the loss through identity_loss; forward, loss, backward, SGD update) and the
inference model's forward, on meta tensors (ViT-B/16 at 224 px costs no memory).

Which level is recorded, and why. PopTorch 3.x traces with the dispatcher: the model runs
on the ``ipu`` device and a boxed fallback registered for *every* operator on the IPU key
(poptorch/source/dispatch_tracer/RegisterAtenOverloads.cpp) receives each aten call after
autograd, i.e. after torch has expanded CompositeImplicitAutograd operators (``linear`` ->
``t`` + ``addmm``, ``softmax`` -> ``_softmax``, ``layer_norm`` -> ``native_layer_norm``).
A ``TorchDispatchMode`` sits at the Python key, which is at that same place in the
dispatch order, so it sees the same aten calls, with two differences, both handled here:

* PopTorch also registers a few CompositeImplicitAutograd operators directly on the IPU key
  (RegisterOptionalAtenOps.cpp.inc: ``dropout``, ``native_layer_norm``, views such as
  ``permute``/``select``/``slice``) so they reach it undecomposed; the mode sees torch's
  decomposition instead (dropout on a non-CUDA tensor: ``empty_like``, ``bernoulli_``,
  ``div_``, ``mul``). Those pieces are each on the list, so the check is stricter, not looser.
* CompositeExplicitAutograd operators (``_to_copy``, ``ones_like``, ``new_empty``) reach the
  mode whole and reach PopTorch as what their kernel calls (``empty`` + ``copy_``); they are
  mapped below to the list entry that covers them.

The decomposition is torch's own, so it can differ between torch 2.14 here and torch 2.0.1,
the torch PopTorch 3.3/3.4 pins; the same test runs under torch 2.0.1 in the second
environment (``make test-torch20``), which is the authoritative run.

Backward and the optimizer update. PopTorch 3.4 traces only the forward (dispatch_tracer/
README.md: "Models can still only be traced in inference mode, with PopART ... applying its
own autograd") and PopART runs the update of a ``poptorch.optim`` optimizer. The backward
and update ops recorded here therefore never reach PopTorch's lowering; each is checked
through the forward op PopART differentiates (``gelu_backward`` -> ``gelu``) or, for the
update, the pointwise op it performs (in-place ``add_`` as ``add``, as PopTorch traces
in-place ops out of place).
"""
import collections
import os
import sys
from typing import Dict, List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import poptorch_double
from vit_accel.backends.ipu import IPUBackend, TrainingWrapper, apply_plan, build_optimizer
from vit_accel.config import load_recipe
from vit_accel.model import create_vit

LIST = os.path.join(os.path.dirname(__file__), "poptorch_supported_ops.txt")

# Sentences of supported_ops.rst that cover operations its bullet lists do not name.
VIEWS = "Tensor operations: 'We will also create tensor views' (views and reshapes)"
HOST = "Tensor operations: 'executed before even reaching the IPU' / 'contiguous() ... ignored'"
CASTS = "16-bit float operations: 'Tensors and models can be freely cast to and from float16'"
# Operators the rst does not list that PopTorch 3.4 handles itself (graphcore/poptorch sdk-release-3.4,
# c2a8b177, the same commit as the list): what it makes of each on the IPU.
CLONE = ("lowered: popart_canonicalization/TensorOps.cpp cloneHandler -> popart identity, a copy on the IPU")
COPY = ("lowered: dispatch_tracer/RegisterAtenOverloads.cpp copyInplace (IPU -> IPU) -> TensorOps.cpp "
        "copyHandler -> popart identity, or a cast when the dtypes differ")
DETACH = ("free: dispatch_tracer/RegisterAtenOverloads.cpp detach -> AtenHandlers.gen.cpp detachHandler -> "
          "popart detach, no computation (it stops the gradient)")

# Where the step emits them, and why. Forward and inference run on the IPU; torch's backward and the
# optimizer update never reach PopTorch (PopART differentiates the forward and runs the poptorch.optim update).
EMITTED = {
    ("forward+loss", "aten::clone"): "reshape of a non-contiguous view in the attention (the transposed key "
                                     "folded into bmm, the heads merged back): a copy, lowered as one",
    ("inference", "aten::clone"): "the same copies of the attention's views",
    ("forward+loss", "aten::detach"): "autograd saving an output for the backward (softmax, log_softmax); "
                                      "PopTorch traces the forward without torch's autograd, and a detach is free",
    ("inference", "aten::detach"): "as in the training forward",
    ("backward", "aten::clone"): "torch's view backward making a gradient contiguous: PopART's backward instead",
    ("backward", "aten::detach"): "saved outputs unpacked, AccumulateGrad storing .grad: PopART's backward instead",
    ("update", "aten::clone"): "SGD's first momentum buffer, clone(grad).detach(): PopART's update instead",
    ("update", "aten::detach"): "as the clone: PopART's update instead",
    # copy_ (none in torch 2.14's trace; torch 2.0's decompositions may write one): IPU -> IPU, lowered
    ("forward+loss", "aten::copy_"): "a copy between IPU tensors, lowered as one",
    ("inference", "aten::copy_"): "a copy between IPU tensors, lowered as one",
    ("backward", "aten::copy_"): "torch's backward writing a gradient: PopART's backward instead",
    ("update", "aten::copy_"): "torch's optimizer writing its state: PopART's update instead",
}

# aten operator (overload packet) -> the list entry, or the rst sentence, that covers it.
COVERED = {
    # creation
    "arange": "torch.arange", "ones_like": "torch.ones_like", "zeros_like": "torch.zeros_like",
    "new_zeros": "torch.Tensor.new_zeros", "new_ones": "torch.Tensor.new_ones", "full": "torch.full",
    "fill": "tensor.fill", "zeros": "torch.zeros", "ones": "torch.ones",
    "empty_like": HOST, "empty": HOST, "new_empty": HOST, "lift_fresh": HOST, "alias": VIEWS,
    "clone": CLONE, "copy": COPY, "detach": DETACH,
    # views, indexing, joining
    "view": "torch.reshape", "_unsafe_view": "torch.reshape", "reshape": "torch.reshape",
    "_reshape_alias": "torch.reshape", "t": "torch.t", "transpose": "torch.transpose",
    "unsqueeze": "torch.unsqueeze", "squeeze": "torch.squeeze", "expand": "tensor.expand",
    "cat": "torch.cat", "stack": "torch.stack", "split": "torch.split", "split_with_sizes": "torch.split",
    "unbind": "torch.unbind", "permute": VIEWS, "select": VIEWS, "slice": VIEWS, "as_strided": VIEWS,
    "where": "torch.where", "gather": "torch.gather", "index_select": "torch.index_select",
    # casts
    "_to_copy": CASTS, "to": CASTS,
    # random
    "bernoulli": "torch.bernoulli",
    # pointwise
    "add": "torch.add", "sub": "torch.sub", "rsub": "torch.sub", "mul": "torch.mul", "div": "torch.div",
    "neg": "torch.neg", "exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt", "rsqrt": "torch.rsqrt",
    "pow": "torch.pow", "tanh": "torch.tanh", "sigmoid": "torch.sigmoid", "abs": "torch.abs",
    "clamp": "torch.clamp", "clamp_min": "torch.clamp_min", "clamp_max": "torch.clamp_max",
    "addcdiv": "torch.addcdiv", "reciprocal": "torch.reciprocal", "square": "torch.square",
    # reductions and comparisons
    "sum": "torch.sum", "mean": "torch.mean", "amax": "torch.amax", "max": "torch.max", "argmax": "torch.argmax",
    "eq": "torch.eq", "ne": "torch.ne", "lt": "torch.lt", "gt": "torch.gt", "topk": "torch.topk",
    "norm": "torch.norm", "linalg_vector_norm": "torch.linalg.vector_norm",
    # BLAS, layers
    "mm": "torch.matmul", "bmm": "torch.bmm", "addmm": "torch.addmm", "matmul": "torch.matmul",
    "linear": "torch.nn.Linear", "convolution": "torch.nn.Conv2d", "native_layer_norm": "torch.nn.LayerNorm",
    "gelu": "torch.nn.GELU", "_softmax": "torch.nn.Softmax", "_log_softmax": "torch.nn.LogSoftmax",
    "native_dropout": "torch.nn.dropout", "dropout": "torch.nn.dropout",
    "nll_loss_forward": "torch.nn.NLLLoss",
}

# backward op -> the forward op PopART differentiates in its place
GRAD_OF = {
    "convolution_backward": "convolution", "native_layer_norm_backward": "native_layer_norm",
    "gelu_backward": "gelu", "_softmax_backward_data": "_softmax", "_log_softmax_backward_data": "_log_softmax",
    "select_backward": "select", "slice_backward": "slice", "native_dropout_backward": "native_dropout",
    "tanh_backward": "tanh", "nll_loss_backward": "nll_loss_forward", "embedding_dense_backward": "embedding",
}


def supported_entries() -> List[str]:
    with open(LIST) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _packet(func) -> str:
    """'aten::gelu_backward' for aten.gelu_backward.default."""
    return func.overloadpacket._qualified_op_name if hasattr(func, "overloadpacket") else str(func)


def coverage(packet: str) -> str:
    """The list entry (or rst sentence) that covers an aten op; '' when nothing does."""
    name = packet.split("::", 1)[-1]
    name = GRAD_OF.get(name, name)
    if name not in COVERED and name.endswith("_") and not name.endswith("__"):
        name = name[:-1]                        # traced out of place (in-place ops are supported)
    name = GRAD_OF.get(name, name)
    return COVERED.get(name, "")


class OpRecorder(TorchDispatchMode):
    """Records (aten op, emitting module) for every call. Forward: the innermost module
    running (forward hooks). Backward: the module whose forward created the autograd node
    being run (nodes labelled by each module's forward hook, innermost first)."""

    def __init__(self, model: torch.nn.Module, phase: str):
        super().__init__()
        self.phase, self.ops = phase, collections.OrderedDict()   # type: str, Dict[Tuple[str, str], int]
        self.stack = []                                           # type: List[str]
        self.node_owner = {}                                      # type: Dict[object, str]
        self._current_node = getattr(torch._C, "_current_autograd_node", None)
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._enter(name or "<model>")))
            self.handles.append(mod.register_forward_hook(self._leave(name or "<model>")))

    def _enter(self, name):
        def hook(mod, inputs):
            self.stack.append(name)
        return hook

    def _leave(self, name):
        def hook(mod, inputs, output):
            self.stack.pop()
            outs = output if isinstance(output, tuple) else (output,)
            todo = [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
            while todo:                          # label this module's new autograd nodes
                node = todo.pop()
                if node is None or node in self.node_owner:
                    continue
                self.node_owner[node] = name
                todo.extend(n for n, _ in node.next_functions)
        return hook

    def where(self) -> str:
        if self.stack:
            return self.stack[-1]
        if self.phase == "backward" and self._current_node is not None:
            node = self._current_node()
            return self.node_owner.get(node, "<loss>") if node is not None else "<autograd>"
        return {"update": "<optimizer>"}.get(self.phase, "<loss>")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = _packet(func)
        if not op.startswith("profiler::"):     # record_function markers (the optimizer's), no computation
            key = (op, self.where())
            self.ops[key] = self.ops.get(key, 0) + 1
        return func(*args, **(kwargs or {}))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def unsupported(recorded: Dict[str, Dict[Tuple[str, str], int]], listed: List[str]) -> List[str]:
    """One line per (phase, op, module) that no list entry covers."""
    bad = []
    for phase, ops in recorded.items():
        for (op, module), n in ops.items():
            entry = coverage(op)
            if not entry:
                bad.append(f"{phase}: {op} (x{n}) emitted by {module}: not in PopTorch 3.4's supported ops")
            elif entry.startswith(("torch.", "tensor.")) and entry not in listed:
                bad.append(f"{phase}: {op} emitted by {module} maps to {entry}, which the list lacks")
    return bad


@pytest.fixture
def double(monkeypatch):
    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    return poptorch_double


def record_ipu_step(recipe_name: str, overrides=(), size=None) -> Dict[str, Dict[Tuple[str, str], int]]:
    """The ops of one IPU micro-batch (forward + loss, backward, two updates: the first
    creates the momentum) and of the inference forward, as the backend builds the model."""
    r = load_recipe(recipe_name, list(overrides))
    backend = IPUBackend(r)
    from vit_accel.engine.trainer import build_model

    with torch.device("meta"):
        model = build_model(r, backend)
    model.train()
    if r.ipu.half:
        model.half()
    apply_plan(model, backend.plan, poptorch_double)
    opt = build_optimizer(model, r, poptorch_double)
    wrapper = TrainingWrapper(model, r.optim.label_smoothing)
    dtype = torch.half if r.ipu.half else torch.float
    img = r.model.img_size
    x = torch.empty(r.ipu.micro_batch_size, 3, img, img, dtype=dtype, device="meta")
    y = torch.empty(r.ipu.micro_batch_size, dtype=torch.int32, device="meta")   # int64 labels arrive as int32
    out = {}
    rec = OpRecorder(model, "forward")
    with rec:
        _, loss = wrapper(x, y)
    rec.close()
    out["forward+loss"] = rec.ops
    labels = rec.node_owner
    rec = OpRecorder(model, "backward")
    rec.node_owner = labels                  # the forward's autograd nodes, by module
    with rec:
        loss.backward()
    rec.close()
    out["backward"] = rec.ops
    rec = OpRecorder(model, "update")
    with rec:
        opt.step()
        opt.step()
    rec.close()
    out["update"] = rec.ops
    model.eval()
    rec = OpRecorder(model, "inference")
    with rec, torch.no_grad():
        model(x)
    rec.close()
    out["inference"] = rec.ops
    return out


def test_the_list_is_the_rst_of_sdk_release_3_4():
    listed = supported_entries()
    with open(LIST) as f:
        head = f.read(600)
    assert "graphcore/poptorch" in head and "sdk-release-3.4" in head and "c2a8b177" in head
    assert len(listed) == 227 and len(set(listed)) == len(listed)
    for entry in ("torch.nn.LayerNorm", "torch.nn.GELU", "torch.addmm", "torch.bernoulli", "torch.nn.Conv2d"):
        assert entry in listed
    assert "torch.nn.MultiheadAttention" not in listed and "torch.einsum" not in listed
    for entry in set(COVERED.values()):
        if entry.startswith(("torch.", "tensor.")):
            assert entry in listed, entry


def test_vit_b16_ft_ipu_step_uses_only_supported_ops(double):
    recorded = record_ipu_step("vit-b16-ft")
    fwd = {op for op, _ in recorded["forward+loss"]}
    # the attention is the explicit matmul-softmax-matmul PopTorch lowers, not SDPA
    assert {"aten::bmm", "aten::_softmax", "aten::gelu", "aten::native_layer_norm", "aten::convolution"} <= fwd
    assert not any("scaled_dot_product" in op for op in fwd)
    assert any(m.startswith("blocks.11.attn") for _, m in recorded["forward+loss"])
    assert {op for op, _ in recorded["backward"]} >= {"aten::gelu_backward", "aten::convolution_backward"}
    assert ("aten::gelu_backward", "blocks.0.mlp.act") in recorded["backward"]   # attributed through autograd
    bad = unsupported(recorded, supported_entries())
    assert not bad, "\n".join(bad)


def test_clone_copy_and_detach_are_emitted_only_where_their_reason_holds(double):
    """clone, copy_ and detach are not on the rst's lists: each emission has a written reason (EMITTED) and
    a PopTorch lowering (COVERED); a copy in the forward anywhere but the attention's views needs one too."""
    recorded = record_ipu_step("vit-b16-ft")
    seen = set()
    for phase, ops in recorded.items():
        for op, module in ops:
            if op.split("::")[-1].rstrip("_") not in ("clone", "copy", "detach"):
                continue
            seen.add((phase, op))
            assert (phase, op) in EMITTED, f"{phase}: {op} emitted by {module}: say why in EMITTED"
            if phase in ("forward+loss", "inference") and op == "aten::clone":
                assert module.endswith(".attn"), f"{phase}: a copy emitted by {module}, not by the attention"
            assert coverage(op) in (CLONE, COPY, DETACH)
    # the attention's copies are real and on the IPU: they are lowered, not host-side
    assert {("forward+loss", "aten::clone"), ("inference", "aten::clone")} <= seen
    assert all(module.endswith(".attn") for phase in ("forward+loss", "inference")
               for op, module in recorded[phase] if op == "aten::clone")


def test_digits_recipe_ipu_step_uses_only_supported_ops(double):
    recorded = record_ipu_step("vit-ti-digits", ["model.drop_path_rate=0.1"])
    # AdamW's update (lerp_, addcmul_) is PopART's Adam, not torch's ops: the double runs
    # torch.optim.AdamW in its place, so only the SGD update of vit-b16-ft is checked
    del recorded["update"]
    bad = unsupported(recorded, supported_entries())
    assert not bad, "\n".join(bad)


class _Erfinv(torch.nn.Module):
    def forward(self, x):
        return torch.erfinv(x.clamp(-0.5, 0.5))


def test_an_unsupported_op_is_named_with_its_module(double):
    model = create_vit("vit-ti16", img_size=16, patch_size=8, depth=2, num_classes=3, attn_impl="eager")
    model.blocks[1].mlp.act = _Erfinv()          # aten::erfinv is on no list
    x = torch.randn(2, 3, 16, 16)
    rec = OpRecorder(model, "forward")
    with rec:
        model(x)
    rec.close()
    bad = unsupported({"forward": rec.ops}, supported_entries())
    assert bad == ["forward: aten::erfinv (x1) emitted by blocks.1.mlp.act: not in PopTorch 3.4's supported ops"]


def test_sdpa_decomposes_only_in_torch_2_0(double):
    """Why the IPU path builds attn_impl="eager": torch 2.0.1 (PopTorch 3.3/3.4) expands
    F.scaled_dot_product_attention on a non-CUDA device into supported matmul/softmax ops,
    newer torch dispatches one fused CPU kernel that PopTorch has no handler for."""
    model = create_vit("vit-ti16", img_size=16, patch_size=8, depth=1, num_classes=3, attn_impl="sdpa").eval()
    x = torch.randn(2, 3, 16, 16)
    rec = OpRecorder(model, "inference")
    with rec, torch.no_grad():
        model(x)
    rec.close()
    bad = unsupported({"inference": rec.ops}, supported_entries())
    if torch.__version__.startswith("2.0."):
        assert bad == [] and ("aten::bmm", "blocks.0.attn") in rec.ops
    else:
        assert len(bad) == 1 and "scaled_dot_product" in bad[0] and "emitted by blocks.0.attn" in bad[0], bad
