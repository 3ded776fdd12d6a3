"""torchrun worker for tests/test_zero.py: the DeepSpeed strategy driven directly, no trainer.

    torchrun --nproc_per_node 2 tests/zero_worker.py --out DIR --runs=-1:fp32,0:fp32,3:fp32,3:bf16 [--val SPEC]

For each run (zero_stage:precision) it builds CPUBackend with a small ViT, trains a few steps on
seeded synthetic data (the same on every run), checkpoints half-way, and records per-step losses.
A ZeRO run then resumes from that checkpoint in a fresh backend and replays the second half, and
evaluates a fixed batch. Rank 0 writes DIR/results.json; the test compares the runs.

With --val, the same processes then evaluate under ZeRO-3 over the validation shards SPEC, which
split unevenly over the ranks: each writes DIR/eval/rank{R}.json (forward calls made, the summed result).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vit_accel.backends import create_backend  # noqa: E402
from vit_accel.backends.cpu import CPUBackend  # noqa: E402
from vit_accel.config import Recipe, load_recipe  # noqa: E402
from vit_accel.data import build_eval_loader  # noqa: E402
from vit_accel.engine import distributed  # noqa: E402
from vit_accel.engine.schedule import lr_at  # noqa: E402
from vit_accel.engine.trainer import build_model, evaluate  # noqa: E402
from vit_accel.model import create_vit  # noqa: E402

MODEL = dict(img_size=32, patch_size=8, num_classes=10, depth=3)


def make_recipe(stage: int, precision: str, steps: int) -> Recipe:
    r = Recipe()
    r.model.name, r.model.img_size, r.model.patch_size, r.model.num_classes = "vit-ti16", 32, 8, 10
    r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.clip_grad_norm = "adamw", 2e-3, 0.05, 1.0
    r.optim.no_decay_1d = True
    r.schedule.total_steps, r.schedule.warmup_steps = steps, 2
    r.train.global_batch_size = 16          # 2 processes x micro 4 x accumulation 2
    r.cpu.micro_batch_size = 4
    r.cpu.precision = precision
    r.distributed.zero_stage = stage
    return r


def batch(step: int, rank: int, n: int):
    """Learnable synthetic digits: the class sets the brightness of one image row band."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 96, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, :, 3 * c:3 * c + 3, :] += 150
    return images, labels


def build(stage: int, precision: str, steps: int, seed: int):
    backend = CPUBackend(make_recipe(stage, precision, steps))
    torch.manual_seed(seed)
    backend.setup(create_vit("vit-ti16", **MODEL))
    return backend


def run_steps(backend, start: int, end: int):
    r = backend.recipe
    out = []
    for step in range(start, end):
        images, labels = batch(step, distributed.rank(), backend.batch_per_call)
        res = backend.train_step(images, labels, lr_at(step, r.schedule, r.optim.lr))
        out.append(res.loss)
    return out


def mean_over_ranks(backend, values):
    t = distributed.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
    return (t / distributed.world_size()).tolist()


def uneven_eval(val: str, out: Path) -> None:
    """ZeRO-3 validation through the trainer's evaluate, counting the backend's forward calls."""
    recipe = load_recipe("vit-ti-digits", ["model.depth=1", "train.global_batch_size=16", "cpu.micro_batch_size=8",
                                           "train.eval_batch_size=16", "distributed.zero_stage=3",
                                           "data.source=shards", "model.num_classes=10", "data.workers=0"],
                         backends=["cpu"])
    torch.manual_seed(0)
    backend = create_backend("cpu", recipe)
    backend.setup(build_model(recipe, backend))
    calls = []
    inner = backend.eval_step
    backend.eval_step = lambda images: calls.append(images.shape[0]) or inner(images)
    loader = build_eval_loader(dataclasses.replace(recipe.data, val_shards=val), recipe.model.img_size,
                               backend.eval_batch_size, rank=distributed.rank(), world_size=distributed.world_size(),
                               return_keys=True)
    res = evaluate(backend, recipe, loader, [str(i) for i in range(10)])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"rank{distributed.rank()}.json", "w") as f:
        json.dump({"calls": len(calls), "images": calls, "own_samples": loader.num_samples, **res}, f)
    backend.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="-1:fp32,0:fp32,1:fp32,2:fp32,3:fp32",
                    help="comma-separated zero_stage:precision (pass as --runs=... because of the '-1')")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--local_rank", type=int, default=None)   # the deepspeed launcher passes it
    ap.add_argument("--val", default=None, help="then: ZeRO-3 validation over these shards (uneven_eval)")
    args = ap.parse_args()
    out = Path(args.out)
    results = {}
    probe, _ = batch(999, 0, 8)                              # same eval batch on every rank
    for spec in args.runs.split(","):
        stage_s, precision = spec.split(":")
        stage, half = int(stage_s), args.steps // 2
        backend = build(stage, precision, args.steps, seed=0)
        losses = run_steps(backend, 0, half)
        ckpt = out / spec.replace(":", "_").replace("-", "m") / "checkpoints" / f"step_{half:07d}.pt"
        extra = {"step": half, "marker": spec}
        returned = backend.save_state(ckpt, extra)
        losses += run_steps(backend, half, args.steps)
        rec = {"losses": mean_over_ranks(backend, losses), "grad_accum": backend.gradient_accumulation,
               "checkpoint": str(returned)}
        logits = backend.eval_step(probe)
        if stage >= 0:
            rec["zero_stage"] = backend.strategy.zero_stage
            final = out / f"final_{stage}_{precision}.pt"
            backend.save_state(final, {"step": args.steps})
            rec["final"] = str(final)
            # resume in a fresh backend whose own initial weights differ (seed 1)
            fresh = build(stage, precision, args.steps, seed=1)
            state = fresh.load_state(returned)
            rec["resumed_extra"] = {k: state.get(k) for k in ("step", "marker")}
            rec["resumed_losses"] = mean_over_ranks(fresh, run_steps(fresh, half, args.steps))
            # the weights a full run reaches, from rank 0's view, for bit-level comparisons
            sd = backend.model_state_dict()
            rec["state_keys"] = len(sd)
        if distributed.is_main():
            torch.save(logits, out / f"logits_{stage}_{precision}.pt")
        results[spec] = rec
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.val:
        uneven_eval(args.val, out / "eval")
    distributed.barrier()
    distributed.leave_process_group()


if __name__ == "__main__":
    main()
    distributed.end_process(0)          # as the `vit-accel` command ends a process that was in a group
