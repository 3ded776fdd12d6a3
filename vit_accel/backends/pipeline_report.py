"""``vit-accel plan``: a recipe's stage plan, estimates per stage, batch arithmetic and learning rate.

Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any, Dict

from ..config import ConfigError, Recipe
from ..model import count_macs
from .pipeline import build_gpu_plan, build_plan, model_config
from .pipeline_cost import estimate_plan, gpu_cost_model, imbalance, ipu_cost_model, module_params

# GC200 (IPU-M2000 / Bow-2000) In-Processor Memory per IPU: the budget the estimates compare to.
IPU_MEMORY_BYTES = 900 * 10 ** 6
MiB = 2 ** 20


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
