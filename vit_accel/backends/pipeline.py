"""Pipeline stage plans: which module starts which stage, and where to recompute.

A plan is data. It is built from a recipe (``ipu.splits``, ``ipu.layers_per_ipu`` or
``ipu.auto_split``; ``pipeline.stages`` for torch's distributed pipelining), validated with
errors that say what to change, estimated (parameters, memory and FLOPs per stage) and
printed by ``vit-accel plan`` (the estimates are pipeline_cost.py, the report
pipeline_report.py). It is then applied: ``poptorch.BeginBlock`` at each stage
start on IPUs (backends/ipu.py); on the CPU and across processes by backends/pipeline_run.py
(``emulate_pipeline_step``, the test oracle for the micro-batch arithmetic, and
``PipelineRunner`` over torch's ``distributed.pipelining``, one stage per rank).

The module order of a ViT is ``patch_embed, blocks.0 .. blocks.{depth-1}, norm, head``; a
stage holds a contiguous run of it, starting at its ``start``. ``patch_embed`` also owns
``cls_token``/``pos_embed``; ``head`` owns pooling, ``pre_logits`` and the classifier.

Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

from typing import Sequence

from ..config import ConfigError, Recipe, vit_options
from ..model import ViTConfig, vit_config
from .pipeline_cost import CostModel, StageEstimate, estimate_stage, ipu_cost_model
from .stages import Stage, StagePlan, valid_modules


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------

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
