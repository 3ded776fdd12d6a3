"""ZeRO's training state as full tensors in the plain optimizer's layout.

DeepSpeed's own checkpoint (``step_N.ds/``) holds each process's shard, so it resumes only on
the world size and ZeRO stage that wrote it (and DeepSpeed reads it with the full unpickler).
Every ZeRO save therefore also gathers the fp32 master weights and the optimizer's moments of
every parameter into ``step_N.pt``, laid out as ``torch.optim.Optimizer.state_dict()`` of the
same optimizer without DeepSpeed (state indexed by the parameters in group order). That file is
read with ``torch.load(weights_only=True)`` and restores exactly (fp32 values) on any number of
processes, any ZeRO stage, or plain data parallel. Not carried: DeepSpeed's fp16 loss scale
(fp16 needs CUDA; it starts again from its initial scale).

deepspeed is imported only inside these functions (they run only under ZeRO).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..engine import distributed

Groups = List[Tuple[List[torch.nn.Parameter], Dict[str, Any]]]


def record_groups(optimizer: torch.optim.Optimizer) -> Groups:
    """The client optimizer's parameter groups (parameters, hyperparameters), taken before
    DeepSpeed replaces them with flat partitions."""
    return [(list(g["params"]), {k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]


def _inner(engine) -> torch.optim.Optimizer:
    """The torch optimizer stepping DeepSpeed's fp32 (flat, partitioned) parameters."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _flat_params(engine) -> List[Tuple[int, torch.Tensor]]:
    """(optimizer group, fp32 flat tensor) that the optimizer's state is kept for. ZeRO-3 puts each
    sub-group's tensor into its group only while stepping it, so they are listed from its own table."""
    opt, inner = engine.optimizer, _inner(engine)
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return [(opt.sub_group_to_group_id[i], t) for i, t in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(i, p) for i, g in enumerate(inner.param_groups) for p in g["params"]]


def _flat_states(engine) -> List[Dict[str, Any]]:
    inner = _inner(engine)
    return [inner.state[t] for _, t in _flat_params(engine) if inner.state.get(t)]


def full_optimizer_state(engine, groups: Groups) -> Dict[str, Any]:
    """The optimizer state as the plain optimizer's ``state_dict()``, on the main process (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    param_groups, state, index = [], {}, 0
    _link(engine)
    flat = _flat_states(engine)
    tensor_keys = sorted(k for k, v in (flat[0] if flat else {}).items() if torch.is_tensor(v) and v.dim() > 0)
    scalars = {k: v for k, v in (flat[0] if flat else {}).items() if k not in tensor_keys}
    main = distributed.is_main()
    for params, hyper in groups:
        param_groups.append(dict(hyper, params=list(range(index, index + len(params)))))
        for p in params:
            entry = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in scalars.items()}
            for key in tensor_keys:
                full = safe_get_full_optimizer_state(p, key)      # every rank takes part
                if full is None:                                    # not partitioned: the optimizer holds p
                    full = _inner(engine).state[p][key]
                if main:
                    entry[key] = full.detach().float().cpu().reshape(p.shape if not hasattr(p, "ds_shape")
                                                                     else p.ds_shape).clone()
            if flat:
                state[index] = entry
            index += 1
    return {"state": state if main else {}, "param_groups": param_groups}


def load_full_state(engine, module: torch.nn.Module, weights: Dict[str, torch.Tensor],
                    optimizer_state: Dict[str, Any], groups: Groups) -> None:
    """Set the fp32 masters, the working weights and the optimizer moments from full tensors
    (every rank holds them; each keeps its own partition)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    missing = [k for k in module.state_dict().keys() if k not in weights]
    if missing:
        raise KeyError("the checkpoint has no weights for %s" % ", ".join(missing[:5]))
    for name, p in module.named_parameters():
        _set_working(p, weights[name])
        safe_set_full_fp32_param(p, weights[name].float())
    for name, b in module.named_buffers():
        if name in weights:
            b.data.copy_(weights[name])
    if not optimizer_state or not optimizer_state.get("state"):
        return
    _create_optimizer_state(engine)
    params = [p for ps, _ in groups for p in ps]
    saved = optimizer_state["state"]
    if len(params) != sum(len(g["params"]) for g in optimizer_state["param_groups"]):
        raise ValueError("the checkpoint's optimizer has %d parameters, this model %d"
                         % (sum(len(g["params"]) for g in optimizer_state["param_groups"]), len(params)))
    inner = _inner(engine)
    for i, p in enumerate(params):
        for key, value in saved.get(i, saved.get(str(i), {})).items():
            if torch.is_tensor(value) and value.dim() > 0:
                if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                    safe_set_full_optimizer_state(p, value.float(), key)
                else:
                    inner.state[p][key].copy_(value)
    scalars = {k: v for k, v in saved[next(iter(saved))].items() if not (torch.is_tensor(v) and v.dim() > 0)}
    for st in _flat_states(engine):   # the step count of every flat partition (Adam's bias correction)
        for key, value in scalars.items():
            st[key] = value.clone() if torch.is_tensor(value) else value


def _set_working(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The low-precision (or fp32) weights the forward pass uses; ZeRO-3 keeps them partitioned."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if distributed.is_main():
                p.data.copy_(value.reshape(p.shape))
    else:
        p.data.copy_(value)


def _create_optimizer_state(engine) -> None:
    """Optimizers create their moments at the first step: take one at learning rate 0 (weights
    unchanged) so the moments exist to be overwritten, and let DeepSpeed link them."""
    if _flat_states(engine):
        return
    inner = _inner(engine)
    flats = _flat_params(engine)
    rates = [g["lr"] for g in inner.param_groups]
    held = [list(g["params"]) for g in inner.param_groups]
    for g in inner.param_groups:
        g["lr"], g["params"] = 0.0, []
    for group, flat in flats:
        inner.param_groups[group]["params"].append(flat)
        flat.grad = torch.zeros_like(flat)
    inner.step()
    for g, lr, params in zip(inner.param_groups, rates, held):
        for flat in g["params"]:
            flat.grad = None
        g["lr"], g["params"] = lr, params
    _link(engine)


def _link(engine) -> None:
    """Point each parameter's view of the optimizer state at the moments of every group.

    ZeRO 1/2 and the bf16 optimizer link the views once, right after stepping the first group,
    when the other groups have no moments yet (DeepSpeed 0.19.8): their views stay empty.
    Linking again once every group has stepped fixes that; the views are narrows of the moments.
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and _flat_states(engine):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
