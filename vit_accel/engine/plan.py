"""What `vit-accel plan` shows: the batch arithmetic, the steps, the learning rate at every step.

Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..config import SCHEDULES, ConfigError, batch_split
from .schedule import build_schedule, needs_train_samples


def recipe_train_samples(recipe: Any) -> Optional[int]:
    """Training samples from the recipe's shards (their manifest), or None when none are set."""
    from ..data import resolve_shards, shard_specs

    spec = shard_specs(recipe.data)[0]
    return resolve_shards(spec).num_samples if spec else None


def batch_arithmetic(recipe: Any, backend: str, world_size: int) -> Dict[str, Any]:
    """How the global batch splits on ``backend``: micro-batch x accumulation x processes/replicas."""
    g = recipe.train.global_batch_size
    if backend == "ipu":
        ipu = recipe.ipu
        return {"backend": "ipu", "global_batch_size": g, "micro_batch_size": ipu.micro_batch_size,
                "gradient_accumulation": ipu.gradient_accumulation, "replicas": ipu.replicas,
                "world_size": ipu.replicas,
                "text": f"micro-batch {ipu.micro_batch_size} x accumulation {ipu.gradient_accumulation} x replicas "
                        f"{ipu.replicas} = global batch {g:,}"}
    sec = getattr(recipe, backend)
    micro, accum = batch_split(g, sec.micro_batch_size, world_size, sec.gradient_accumulation, section=backend)
    return {"backend": backend, "global_batch_size": g, "micro_batch_size": micro,
            "gradient_accumulation": accum, "world_size": world_size,
            "text": f"micro-batch {micro} x accumulation {accum} x world size {world_size} = global batch {g:,}"}


def schedule_plan(recipe: Any, world_size: int = 1, train_samples: Optional[int] = None,
                  backend: str = "gpu") -> Dict[str, Any]:
    """The batch arithmetic, the number of optimizer steps and the learning rate at every step."""
    if train_samples is None and needs_train_samples(recipe.schedule):
        train_samples = recipe_train_samples(recipe)
        if train_samples is None:  # no shards yet: everything but the step count is still known
            return {"kind": recipe.schedule.kind, "description": SCHEDULES[recipe.schedule.kind],
                    "batch": batch_arithmetic(recipe, backend, world_size), "optimizer_steps": None, "lr": None,
                    "unresolved": "lengths are in epochs: pass --train-samples N (ImageNet-1k has 1,281,167) "
                                  "or set data.train_shards to shards with a manifest"}
    sched = build_schedule(recipe.schedule, recipe.optim.lr, recipe.train.global_batch_size, train_samples)
    lrs = sched.lrs()
    return {"kind": sched.kind, "description": SCHEDULES[sched.kind], "summary": sched.describe(),
            "batch": batch_arithmetic(recipe, backend, world_size), "train_samples": sched.train_samples or None,
            "steps_per_epoch": sched.steps_per_epoch or None, "optimizer_steps": sched.total_steps,
            "warmup_steps": sched.warmup_steps, "base_lr": sched.base_lr, "peak_lr": max(lrs),
            "final_lr": lrs[-1], "lr": lrs}


def plot_lr(plan: Dict[str, Any], path: str, title: str = "") -> str:
    """Draw the per-step learning rate of a ``schedule_plan`` into a PNG."""
    if plan["lr"] is None:
        raise ConfigError(f"--lr-plot: {plan['unresolved']}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(range(len(plan["lr"])), plan["lr"], lw=1.2)
    if plan["warmup_steps"]:
        ax.axvline(plan["warmup_steps"], color="gray", ls="--", lw=0.8, label=f"warm-up ends ({plan['warmup_steps']:,})")
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{title + ': ' if title else ''}{plan['kind']}, {plan['optimizer_steps']:,} optimizer steps",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_schedule(plan: Dict[str, Any]) -> str:
    """Three lines for `vit-accel plan`: the schedule, the batch arithmetic, the rate's landmarks."""
    if plan["lr"] is None:
        return "\n".join([f"schedule: {plan['kind']}: {plan['unresolved']}",
                          f"batch ({plan['batch']['backend']}): {plan['batch']['text']}"])
    lr, w = plan["lr"], plan["warmup_steps"]
    return "\n".join([f"schedule: {plan['summary']}",
                      f"batch ({plan['batch']['backend']}): {plan['batch']['text']}",
                      f"lr: step 0 {lr[0]:.4g}, end of warm-up (step {w}) {lr[w]:.4g}, peak {plan['peak_lr']:.4g}, "
                      f"last step {len(lr) - 1} {lr[-1]:.4g}"])
