"""Pipeline stage estimates: parameters, memory and FLOPs per module and per stage, counted
analytically (no model is built), and the cost models of an IPU and a GPU pipeline rank.

Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from ..config import ConfigError, Recipe
from ..hybrid import stem_counts
from ..model import ViTConfig

from .stages import Stage, StagePlan


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


def gpu_cost_model(recipe: Recipe, n_stages: int) -> CostModel:
    precision = recipe.gpu.precision
    state = 8 if recipe.optim.name == "adamw" else (4 if recipe.optim.momentum > 0 else 0)
    micro = max(recipe.train.global_batch_size // max(recipe.pipeline.micro_batches, 1), 1)
    return CostModel(micro_batch=micro, weight_bytes=4, grad_bytes=4, optimizer_bytes=state,
                     activation_bytes=4 if precision == "fp32" else 2,
                     recompute=recipe.ipu.recompute == "every_block", schedule=recipe.pipeline.schedule,
                     micro_batches=recipe.pipeline.micro_batches)
