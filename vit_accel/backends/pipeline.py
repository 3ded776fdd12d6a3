"""Pipeline stage plans: which module starts which stage, and where to recompute.

A plan is data. It is built from a recipe (``ipu.splits``, ``ipu.layers_per_ipu`` or
``ipu.auto_split``; ``pipeline.stages`` for torch's distributed pipelining), validated with
errors that say what to change, estimated (parameters, memory and FLOPs per stage) and
printed by ``vit-accel plan``. It is then applied: ``poptorch.BeginBlock`` at each stage
start on IPUs (backends/ipu.py); on the CPU and across processes by backends/pipeline_run.py
(``emulate_pipeline_step``, the test oracle for the micro-batch arithmetic, and
``PipelineRunner`` over torch's ``distributed.pipelining``, one stage per rank).

The module order of a ViT is ``patch_embed, blocks.0 .. blocks.{depth-1}, norm, head``; a
stage holds a contiguous run of it, starting at its ``start``. ``patch_embed`` also owns
``cls_token``/``pos_embed``; ``head`` owns pooling, ``pre_logits`` and the classifier.

Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence

from ..config import ConfigError, Recipe, vit_options
from ..hybrid import stem_counts
from ..model import ViTConfig, count_macs, vit_config

# GC200 (IPU-M2000 / Bow-2000) In-Processor Memory per IPU: the budget the estimates compare to.
IPU_MEMORY_BYTES = 900 * 10 ** 6
MiB = 2 ** 20


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------

@dataclass
class Stage:
    index: int
    start: str                      # module name that begins the stage ("patch_embed", "blocks.3")
    ipu: int                        # device id (IPU id, or pipeline rank)
    blocks: List[int]               # encoder block indices it holds
    patch_embed: bool = False       # also cls_token, pos_embed
    norm: bool = False
    head: bool = False              # pooling, pre_logits, head

    @property
    def modules(self) -> List[str]:
        return ((["patch_embed"] if self.patch_embed else []) + [f"blocks.{i}" for i in self.blocks]
                + (["norm"] if self.norm else []) + (["head"] if self.head else []))

    def describe_blocks(self) -> str:
        if not self.blocks:
            return "-"
        return str(self.blocks[0]) if len(self.blocks) == 1 else f"{self.blocks[0]}-{self.blocks[-1]}"


@dataclass
class StagePlan:
    stages: List[Stage]
    depth: int
    recompute: List[int]            # blocks whose outputs are recomputation checkpoints
    source: str                     # "splits", "layers_per_ipu", "auto" or "pipeline.stages"

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def starts(self) -> List[str]:
        return [s.start for s in self.stages]

    @property
    def layers_per_stage(self) -> List[int]:
        return [len(s.blocks) for s in self.stages]

    def stage_of_module(self, name: str) -> Stage:
        for s in self.stages:
            if name in s.modules:
                return s
        raise KeyError(f"{name!r} is in no stage; modules: {valid_modules(self.depth)}")

    def stage_of_param(self, param_name: str) -> Stage:
        """The stage owning a timm-keyed parameter (``blocks.4.mlp.fc1.weight`` -> its stage)."""
        return self.stage_of_module(module_of_param(param_name))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def valid_modules(depth: int) -> List[str]:
    return ["patch_embed"] + [f"blocks.{i}" for i in range(depth)] + ["norm", "head"]


def module_of_param(name: str) -> str:
    """Map a state-dict key to the plan's module name."""
    top = name.split(".")[0]
    if top in ("patch_embed", "cls_token", "pos_embed"):
        return "patch_embed"
    if top == "blocks":
        return ".".join(name.split(".")[:2])
    if top == "norm":
        return "norm"
    if top in ("pre_logits", "head"):
        return "head"
    raise KeyError(f"parameter {name!r} belongs to no plan module")


def plan_from_starts(starts: Sequence[str], depth: int, num_devices: int, recompute: str = "every_block",
                     source: str = "splits", what: str = "ipu.splits",
                     devices_key: str = "ipu.ipus_per_replica") -> StagePlan:
    """Validate stage starts and build the plan. A list not starting at ``patch_embed`` gets
    it prepended: PopTorch runs everything before the first annotated block on IPU 0."""
    order = valid_modules(depth)
    starts = list(starts)
    if not starts:
        raise ConfigError(f"{what} is empty; give the module that starts each stage, e.g. "
                          f"[patch_embed, blocks.{depth // 2}]")
    unknown = [s for s in starts if s not in order]
    if unknown:
        raise ConfigError(f"{what}: unknown module {unknown[0]!r}; valid stage starts for depth {depth}: "
                          f"{', '.join(order)}")
    if starts[0] != "patch_embed":
        starts = ["patch_embed"] + starts
    pos = [order.index(s) for s in starts]
    for a, b, pa, pb in zip(starts, starts[1:], pos, pos[1:]):
        if pb <= pa:
            raise ConfigError(f"{what}: stages out of order: {b!r} does not come after {a!r} "
                              f"(module order: patch_embed, blocks.0 .. blocks.{depth - 1}, norm, head)")
    if len(starts) > num_devices:
        raise ConfigError(f"{what}: {len(starts)} stages ({', '.join(starts)}) but {devices_key} is "
                          f"{num_devices}: each stage needs its own device; remove splits or raise "
                          f"{devices_key}")
    if len(starts) < num_devices:
        raise ConfigError(f"{what}: {len(starts)} stages but {devices_key} is {num_devices}; with "
                          f"AutoStage.SameAsIpu each stage runs on its own device, so set "
                          f"{devices_key}={len(starts)} or add splits")
    if recompute not in ("every_block", "none"):
        raise ConfigError(f"ipu.recompute: {recompute!r} is not one of every_block, none")
    stages = []
    for i, (p0, p1) in enumerate(zip(pos, pos[1:] + [len(order)])):
        mods = order[p0:p1]
        stages.append(Stage(index=i, start=starts[i], ipu=i,
                            blocks=[int(m.split(".")[1]) for m in mods if m.startswith("blocks.")],
                            patch_embed="patch_embed" in mods, norm="norm" in mods, head="head" in mods))
    ckpts = list(range(depth)) if recompute == "every_block" else []
    return StagePlan(stages=stages, depth=depth, recompute=ckpts, source=source)


def plan_from_layers(layers: Sequence[int], depth: int, num_devices: int, recompute: str = "every_block",
                     what: str = "ipu.layers_per_ipu") -> StagePlan:
    """``[3, 3, 3, 3]``: blocks per stage; patch_embed on the first, norm and head on the last."""
    layers = list(layers)
    if any(n < 0 for n in layers) or any(n == 0 for n in layers[1:-1]):
        raise ConfigError(f"{what}: {layers}: only the first and last stage may hold 0 blocks")
    if sum(layers) != depth:
        raise ConfigError(f"{what}: {layers} adds up to {sum(layers)} blocks but the model has depth {depth}")
    starts, cum = ["patch_embed"], layers[0]
    for n in layers[1:]:
        starts.append(f"blocks.{cum}" if n else "norm")
        cum += n
    return plan_from_starts(starts, depth, num_devices, recompute, source="layers_per_ipu", what=what)


# ---------------------------------------------------------------------------------------
# Estimates: parameters, memory and FLOPs per module and per stage
# ---------------------------------------------------------------------------------------

def module_params(cfg: ViTConfig) -> Dict[str, int]:
    """Parameters per plan module, counted analytically (no model is built)."""
    d, h = cfg.width, cfg.mlp_hidden
    out = {"patch_embed": cfg.embed_in_chans * cfg.patch_size ** 2 * d + d + d + (1 + cfg.num_patches) * d
           + _stem(cfg)["params"]}
    block = (3 * d * d + (3 * d if cfg.qkv_bias else 0)) + (d * d + d) + (d * h + h) + (h * d + d) + 4 * d
    for i in range(cfg.depth):
        out[f"blocks.{i}"] = block
    out["norm"] = 2 * d
    feat = cfg.representation_size or d
    pre = (d * feat + feat) if cfg.representation_size else 0
    out["head"] = pre + ((feat * cfg.num_classes + cfg.num_classes) if cfg.num_classes else 0)
    return out


def module_macs(cfg: ViTConfig) -> Dict[str, int]:
    """Forward multiply-adds per image per plan module (they sum to ``model.count_macs``)."""
    n, t, d, h = cfg.num_patches, cfg.num_patches + 1, cfg.width, cfg.mlp_hidden
    out = {"patch_embed": n * cfg.embed_in_chans * cfg.patch_size ** 2 * d + _stem(cfg)["macs"]}
    block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * h
    for i in range(cfg.depth):
        out[f"blocks.{i}"] = block
    out["norm"] = 0
    feat = cfg.representation_size or d
    out["head"] = (d * cfg.representation_size if cfg.representation_size else 0) + feat * cfg.num_classes
    return out


def _stem(cfg: ViTConfig) -> Dict[str, int]:
    """The hybrid's ResNet stem (part of the patch_embed module, so always on the first stage)."""
    return stem_counts(cfg.hybrid_layers, cfg.in_chans, cfg.img_size) if cfg.hybrid_layers else {"params": 0, "macs": 0}


def block_activation_elems(cfg: ViTConfig) -> int:
    """Elements one block keeps for its backward, per image: norm1, qkv, scores and softmax,
    attn@v, proj, norm2, fc1 and GELU outputs, fc2, the two residuals."""
    t, d, h = cfg.num_patches + 1, cfg.width, cfg.mlp_hidden
    return t * (10 * d + 2 * h) + 2 * cfg.num_heads * t * t


@dataclass
class CostModel:
    """How a device stores a stage. Bytes per element; ``in_flight(s, n)`` is how many
    micro-batches stage s of n holds activations for at once."""
    micro_batch: int
    weight_bytes: int = 2
    grad_bytes: int = 2             # gradient accumulator (0 without accumulation)
    optimizer_bytes: int = 2        # optimizer state per parameter (velocity; 2 moments for Adam)
    optimizer_divisor: int = 1      # replicated tensor sharding splits optimizer state over replicas
    activation_bytes: int = 2
    recompute: bool = True
    schedule: str = "ipu"           # "ipu" (PopART: 2(n-s)-1 in flight), "gpipe", "1f1b"
    micro_batches: int = 1          # for gpipe / 1f1b

    def in_flight(self, s: int, n: int) -> int:
        if self.schedule == "gpipe":
            return self.micro_batches
        if self.schedule == "1f1b":
            return min(n - s, self.micro_batches)
        return 2 * (n - s) - 1      # fwd of stage s until its bwd: the fused last stage turns around at once


@dataclass
class StageEstimate:
    stage: int
    params: int
    weights_bytes: int
    optimizer_bytes: int            # gradient accumulator + optimizer state on this device
    activation_bytes: int
    total_bytes: int
    gflop_per_micro_batch: float    # training: forward + backward (+ recompute)


def estimate_stage(stage: Stage, n_stages: int, cfg: ViTConfig, cm: CostModel) -> StageEstimate:
    params_by, macs_by = module_params(cfg), module_macs(cfg)
    params = sum(params_by[m] for m in stage.modules)
    macs = sum(macs_by[m] for m in stage.modules)
    tokens = (cfg.num_patches + 1) * cfg.width
    stash_in = cfg.in_chans * cfg.img_size ** 2 if stage.patch_embed else tokens
    k = len(stage.blocks) + (1 if stage.patch_embed else 0)   # tensors produced inside the stage
    flight = cm.in_flight(stage.index, n_stages)
    if cm.recompute:
        # stashed: the stage input and each checkpointed block output per in-flight micro-batch;
        # live: one block being recomputed for its backward
        act = flight * (stash_in + k * tokens) + (block_activation_elems(cfg) if stage.blocks else 0)
    else:
        act = flight * (stash_in + tokens + len(stage.blocks) * block_activation_elems(cfg))
    w = params * cm.weight_bytes
    opt = params * cm.grad_bytes + params * cm.optimizer_bytes // max(cm.optimizer_divisor, 1)
    a = act * cm.micro_batch * cm.activation_bytes
    flops = 2 * macs * cm.micro_batch * (4 if cm.recompute and stage.blocks else 3)
    return StageEstimate(stage.index, params, w, opt, a, w + opt + a, flops / 1e9)


def estimate_plan(plan: StagePlan, cfg: ViTConfig, cm: CostModel) -> List[StageEstimate]:
    return [estimate_stage(s, plan.num_stages, cfg, cm) for s in plan.stages]


def imbalance(values: Sequence[float]) -> float:
    """max / mean: 1.0 is perfectly balanced; the pipeline runs at the pace of the max."""
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def auto_plan(cfg: ViTConfig, num_devices: int, cm: CostModel, recompute: str = "every_block") -> StagePlan:
    """Contiguous blocks per stage minimizing the largest stage cost (exact DP).

    A stage's cost is max(memory / reference memory, FLOPs / mean FLOPs): the share of the
    binding resource, 1.0 being an even share. The reference memory is the mean stage memory of
    the most even layer split, so both terms are in the same unit. Patch embedding stays on
    the first stage and norm + head on the last, as in every published split.
    """
    depth, n = cfg.depth, num_devices
    if n < 1 or n > depth:
        raise ConfigError(f"auto split: {n} devices for {depth} blocks; need 1 <= devices <= depth")
    even = [depth // n + (1 if i < depth % n else 0) for i in range(n)]

    def stage(idx: int, lo: int, hi: int) -> Stage:
        return Stage(index=idx, start="patch_embed" if idx == 0 else f"blocks.{lo}", ipu=idx,
                     blocks=list(range(lo, hi)), patch_embed=idx == 0, norm=idx == n - 1, head=idx == n - 1)

    def est(idx: int, lo: int, hi: int) -> StageEstimate:
        return estimate_stage(stage(idx, lo, hi), n, cfg, cm)

    cum = [0]
    for c in even:
        cum.append(cum[-1] + c)
    ref = [est(i, cum[i], cum[i + 1]) for i in range(n)]
    mem_ref = sum(e.total_bytes for e in ref) / n
    flop_ref = sum(e.gflop_per_micro_batch for e in ref) / n

    def cost(idx: int, lo: int, hi: int) -> float:
        e = est(idx, lo, hi)
        return max(e.total_bytes / mem_ref, e.gflop_per_micro_batch / flop_ref)

    inf = float("inf")
    # best[s][j]: (max cost, sum of squared costs) of blocks 0..j-1 split into stages 0..s; among
    # splits with the same worst stage, the squares prefer the evener one
    best = [[(inf, inf)] * (depth + 1) for _ in range(n)]
    cut = [[0] * (depth + 1) for _ in range(n)]
    for j in range(1, depth + 1):
        c = cost(0, 0, j)
        best[0][j] = (c, c * c)
    for s in range(1, n):
        for j in range(s + 1, depth + 1):
            for i in range(s, j):
                prev = best[s - 1][i]
                if prev[0] == inf:
                    continue
                c = cost(s, i, j)
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[s][j]:
                    best[s][j], cut[s][j] = cand, i
    bounds, j = [depth], depth
    for s in range(n - 1, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    layers = [b - a for a, b in zip(bounds, bounds[1:])]
    p = plan_from_layers(layers, depth, n, recompute, what="auto split")
    p.source = "auto"
    return p


# ---------------------------------------------------------------------------------------
# From a recipe
# ---------------------------------------------------------------------------------------

def model_config(recipe: Recipe) -> ViTConfig:
    try:
        return vit_config(recipe.model.name, **vit_options(recipe.model))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e


def _dtype_bytes(name: str, what: str) -> int:
    table = {"half": 2, "float16": 2, "fp16": 2, "float": 4, "float32": 4, "fp32": 4}
    if name not in table:
        raise ConfigError(f"{what}: {name!r} is not one of half, float")
    return table[name]


def ipu_cost_model(recipe: Recipe) -> CostModel:
    ipu = recipe.ipu
    momentum = recipe.optim.name == "adamw" or recipe.optim.momentum > 0
    vel = _dtype_bytes(ipu.velocity_accum_type, "ipu.velocity_accum_type")
    state = (2 * vel if recipe.optim.name == "adamw" else vel) if momentum else 0
    if ipu.optimizer_location not in ("on_chip", "off_chip"):
        raise ConfigError(f"ipu.optimizer_location: {ipu.optimizer_location!r} is not one of on_chip, off_chip")
    if ipu.optimizer_location == "off_chip":
        state = 0   # streamed from host/streaming memory; not resident in the IPU's SRAM
    return CostModel(
        micro_batch=ipu.micro_batch_size, weight_bytes=2 if ipu.half else 4,
        grad_bytes=_dtype_bytes(ipu.accum_type, "ipu.accum_type") if ipu.gradient_accumulation > 1 else 0,
        optimizer_bytes=state, optimizer_divisor=ipu.replicas if ipu.replicated_tensor_sharding else 1,
        activation_bytes=2 if ipu.half else 4, recompute=ipu.recompute == "every_block", schedule="ipu")


def build_plan(recipe: Recipe) -> StagePlan:
    """The IPU plan of a recipe: explicit ``ipu.splits`` unless ``ipu.layers_per_ipu`` is given,
    or ``ipu.auto_split``; then the pipeline rules PopTorch enforces."""
    ipu = recipe.ipu
    cfg = model_config(recipe)
    n = ipu.ipus_per_replica
    if n < 1:
        raise ConfigError(f"ipu.ipus_per_replica must be >= 1, got {n}")
    if ipu.auto_split:
        plan = auto_plan(cfg, n, ipu_cost_model(recipe), ipu.recompute)
    elif ipu.layers_per_ipu:
        plan = plan_from_layers(ipu.layers_per_ipu, cfg.depth, n, ipu.recompute)
    else:
        plan = plan_from_starts(ipu.splits, cfg.depth, n, ipu.recompute)
    # PopART needs every fwd and bwd pipeline stage filled: 2N-1 stages (the last forward
    # stage is fused with the first backward one).
    need = 2 * plan.num_stages - 1
    if plan.num_stages > 1 and ipu.gradient_accumulation < need:
        raise ConfigError(f"ipu.gradient_accumulation {ipu.gradient_accumulation} is below {need}: a "
                          f"{plan.num_stages}-IPU pipeline has {need} forward+backward stages to fill")
    return plan


def build_gpu_plan(recipe: Recipe) -> StagePlan:
    """The plan for torch's distributed pipelining: ``pipeline.stages`` (one stage per rank), or the
    IPU plan's stage starts when it is empty (the same plan on both)."""
    cfg = model_config(recipe)
    if recipe.pipeline.stages:
        starts = recipe.pipeline.stages
        n = len(starts) + (0 if starts[0] == "patch_embed" else 1)
        return plan_from_starts(starts, cfg.depth, n, recipe.ipu.recompute, source="pipeline.stages",
                                what="pipeline.stages", devices_key="the number of ranks")
    return build_plan(recipe)


def gpu_cost_model(recipe: Recipe, n_stages: int) -> CostModel:
    precision = recipe.gpu.precision
    state = 8 if recipe.optim.name == "adamw" else (4 if recipe.optim.momentum > 0 else 0)
    micro = max(recipe.train.global_batch_size // max(recipe.pipeline.micro_batches, 1), 1)
    return CostModel(micro_batch=micro, weight_bytes=4, grad_bytes=4, optimizer_bytes=state,
                     activation_bytes=4 if precision == "fp32" else 2,
                     recompute=recipe.ipu.recompute == "every_block", schedule=recipe.pipeline.schedule,
                     micro_batches=recipe.pipeline.micro_batches)


# ---------------------------------------------------------------------------------------
# Report (`vit-accel plan`)
# ---------------------------------------------------------------------------------------

def plan_report(recipe: Recipe, backend: str = "ipu") -> Dict[str, Any]:
    """Everything ``vit-accel plan --json`` prints, as one flat dict (sections nest, keys get added)."""
    cfg = model_config(recipe)
    rep: Dict[str, Any] = {
        "recipe": recipe.name, "backend": backend, "model": cfg.name, "img_size": cfg.img_size,
        "params": sum(module_params(cfg).values()), "tokens_per_image": cfg.num_patches + 1,
        "flops_per_image": 2 * count_macs(cfg), "hybrid_stem": list(cfg.hybrid_layers), "warnings": []}
    if backend == "cpu":  # one process runs the whole model: no stages to plan
        return rep
    if backend == "ipu":
        plan = build_plan(recipe)
        cm = ipu_cost_model(recipe)
    else:
        plan = build_gpu_plan(recipe)
        cm = gpu_cost_model(recipe, plan.num_stages)
    ests = estimate_plan(plan, cfg, cm)
    rep.update({
        "plan": plan.to_dict(), "estimates": [asdict(e) for e in ests],
        "imbalance": {"memory": imbalance([e.total_bytes for e in ests]),
                      "flops": imbalance([e.gflop_per_micro_batch for e in ests]),
                      "params": imbalance([e.params for e in ests])},
    })
    if cfg.hybrid_layers:  # the stem belongs to patch_embed, which every plan puts on the first stage
        rep["stem_stage"] = plan.stage_of_module("patch_embed").index
    if backend == "ipu":
        ipu = recipe.ipu
        step = ipu.micro_batch_size * ipu.gradient_accumulation * ipu.replicas
        rep["batch"] = {"micro_batch_size": ipu.micro_batch_size,
                        "gradient_accumulation": ipu.gradient_accumulation, "replicas": ipu.replicas,
                        "images_per_step": step, "global_batch_size": recipe.train.global_batch_size,
                        "device_iterations": ipu.device_iterations,
                        "images_per_call": step * ipu.device_iterations,
                        "ipus_per_replica": ipu.ipus_per_replica,
                        "ipus_total": ipu.replicas * ipu.ipus_per_replica}
        total = ipu.replicas * ipu.ipus_per_replica
        if total & (total - 1):
            rep["warnings"].append(f"{total} IPUs is not a power of 2: PopTorch reserves a power of 2 per "
                                   f"process (or set autoRoundNumIPUs)")
        for e in ests:
            if e.total_bytes > IPU_MEMORY_BYTES:
                rep["warnings"].append(f"stage {e.stage}: estimated {e.total_bytes / MiB:,.0f} MiB exceeds "
                                       f"the {IPU_MEMORY_BYTES / MiB:,.0f} MiB of one IPU")
    else:
        p = recipe.pipeline
        rep["batch"] = {"global_batch_size": recipe.train.global_batch_size, "micro_batches": p.micro_batches,
                        "micro_batch_size": cm.micro_batch, "schedule": p.schedule,
                        "ranks": plan.num_stages}
        if recipe.train.global_batch_size % p.micro_batches:
            rep["warnings"].append(f"train.global_batch_size {recipe.train.global_batch_size} is not "
                                   f"divisible by pipeline.micro_batches {p.micro_batches}")
    return rep


def format_report(rep: Dict[str, Any]) -> str:
    head = (f"{rep['recipe']}: {rep['model']} at {rep['img_size']} px, {rep['params']:,} parameters, "
            f"{rep['tokens_per_image']} tokens per image, {rep['flops_per_image'] / 1e9:,.2f} GFLOP per image "
            f"forward (analytic, 2 per multiply-add)")
    if rep["backend"] == "cpu":
        return head + "\nbackend cpu: one process runs the whole model (no pipeline stages)"
    plan, ests = rep["plan"], rep["estimates"]
    dev = "ipu" if rep["backend"] == "ipu" else "rank"
    lines = [f"{rep['recipe']}: {rep['model']}, {rep['params']:,} parameters, {len(plan['stages'])} stages "
             f"(from {plan['source']}), backend {rep['backend']}", head,
             "",
             f"stage {dev:>4}  {'starts at':<12} {'blocks':<7} {'norm/head':<9} {'params':>12} "
             f"{'weights':>8} {'optim':>8} {'activ.':>8} {'total':>8}  {'GFLOP/mb':>9}",
             f"{'':>16}{'':<12}{'':<7}{'':<9}{'':>13}{'MiB':>8} {'MiB':>8} {'MiB':>8} {'MiB':>8}"]
    for s, e in zip(plan["stages"], ests):
        blocks = "-" if not s["blocks"] else (f"{s['blocks'][0]}-{s['blocks'][-1]}" if len(s["blocks"]) > 1
                                              else str(s["blocks"][0]))
        nh = "/".join(x for x in ("norm", "head") if s[x]) or "-"
        lines.append(f"{s['index']:>5} {s['ipu']:>4}  {s['start']:<12} {blocks:<7} {nh:<9} {e['params']:>12,} "
                     f"{e['weights_bytes'] / MiB:>8.1f} {e['optimizer_bytes'] / MiB:>8.1f} "
                     f"{e['activation_bytes'] / MiB:>8.1f} {e['total_bytes'] / MiB:>8.1f}  "
                     f"{e['gflop_per_micro_batch']:>9.1f}")
    im = rep["imbalance"]
    lines += ["", f"imbalance (max/mean): memory {im['memory']:.2f}, FLOPs {im['flops']:.2f}, "
                  f"parameters {im['params']:.2f}",
              f"recompute: {len(plan['recompute'])} checkpoints (one after each block)" if plan["recompute"]
              else "recompute: none (every activation kept for the backward)"]
    b = rep["batch"]
    if rep["backend"] == "ipu":
        lines += [f"batch: micro-batch {b['micro_batch_size']} x accumulation {b['gradient_accumulation']} x "
                  f"replicas {b['replicas']} = {b['images_per_step']:,} images per optimizer step "
                  f"(train.global_batch_size {b['global_batch_size']:,})",
                  f"       x device iterations {b['device_iterations']} = {b['images_per_call']:,} images per "
                  f"PopTorch call ({b['device_iterations']} optimizer step(s) per call)",
                  f"IPUs: replicas {b['replicas']} x ipus_per_replica {b['ipus_per_replica']} = "
                  f"{b['ipus_total']} IPUs total",
                  "memory: weights, gradient accumulator + optimizer state, stashed activations at the "
                  "micro-batch; excludes code, exchange and temporary memory "
                  f"(one GC200 IPU has 900 MB = {IPU_MEMORY_BYTES / MiB:,.0f} MiB)"]
    else:
        lines += [f"batch: global {b['global_batch_size']:,} = {b['micro_batches']} micro-batches x "
                  f"{b['micro_batch_size']:,} per step; schedule {b['schedule']}; {b['ranks']} ranks (one stage "
                  f"each)",
                  "memory: fp32 weights + gradients + optimizer state, activations at the micro-batch"]
    if "stem_stage" in rep:
        lines.append(f"ResNet stem {rep['hybrid_stem']}: on stage {rep['stem_stage']} with patch_embed")
    lines += [f"warning: {w}" for w in rep["warnings"]]
    return "\n".join(lines)


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vit-accel plan``: print a recipe's stage plan with no device and no PopTorch."""
    p = subparsers.add_parser("plan", help="print the pipeline stage plan of a recipe (no device needed)",
                              description="Print stages (blocks per device), parameters, estimated memory "
                                          "and FLOPs per device, imbalance and the batch arithmetic.")
    p.add_argument("--backend", choices=("ipu", "gpu", "cpu"), default="ipu",
                   help="whose terms: IPU pipeline stages, GPU pipelining ranks, or the CPU's single process")
    p.add_argument("--config", default="vit-b16-ft", help="recipe name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--world-size", type=int, default=1, help="processes for the batch arithmetic (gpu)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="training samples per epoch (default: the recipe's shards' manifest)")
    p.add_argument("--lr-plot", default=None, metavar="FILE.png", help="draw the per-step learning rate")
    p.set_defaults(func=run_plan_command)
    return p


def run_plan_command(args) -> int:
    from ..config import load_recipe

    from ..data import DataError
    from ..engine.plan import format_schedule, plot_lr, schedule_plan

    try:
        recipe = load_recipe(args.config, args.set)
        rep = plan_report(recipe, args.backend)
        rep["schedule"] = schedule_plan(recipe, args.world_size, args.train_samples, args.backend)
    except (ConfigError, DataError) as e:
        print(f"vit-accel plan: {e}", file=sys.stderr)
        return 2
    if args.lr_plot:
        plot_lr(rep["schedule"], args.lr_plot, title=recipe.name)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep) + "\n" + format_schedule(rep["schedule"]))
    return 0
