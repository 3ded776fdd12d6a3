"""Worker for tests/test_zero.py: ZeRO checkpoints resumed on another number of processes.

    python tests/zero_resize_worker.py --out DIR --check 'W/{stage}_fp32/checkpoints/step_0000002.pt'
    torchrun --nproc_per_node 2 tests/zero_resize_worker.py --out DIR2 --load 'DIR/{stage}/step_0000002.pt'

For each ZeRO stage 1, 2, 3 (fp32): train STEPS steps from seed 0 on global batches (the same
samples whatever the world size: each process takes its slice), checkpointing at HALF into
DIR/STAGE/. With --check, a fresh backend loads the checkpoint the pattern names (written on
another world size) and compares its restored weights and optimizer moments with the file; with
--load, it also trains HALF..STEPS from there. Rank 0 writes DIR/results.json: per stage the losses
(mean over processes), the resumed losses and the largest restore differences.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zero_worker import batch, build  # noqa: E402

from vit_accel.backends.zero_state import full_optimizer_state  # noqa: E402
from vit_accel.engine import distributed  # noqa: E402
from vit_accel.engine.schedule import lr_at  # noqa: E402

STEPS, HALF, GLOBAL = 4, 2, 16


def run_steps(backend, start: int, end: int):
    r, rank, n = backend.recipe, distributed.rank(), backend.batch_per_call
    out = []
    for step in range(start, end):
        images, labels = batch(step, 0, GLOBAL)           # one global batch; each process its slice
        res = backend.train_step(images[rank * n:(rank + 1) * n], labels[rank * n:(rank + 1) * n],
                                 lr_at(step, r.schedule, r.optim.lr))
        out.append(res.loss)
    t = distributed.all_reduce_sum(torch.tensor(out, dtype=torch.float64))
    return (t / distributed.world_size()).tolist()


def restore_differences(backend, path: Path):
    """Largest |restored - saved| over the weights and over the optimizer moments."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    weights = backend.model_state_dict()
    w = max((weights[k] - saved["model"][k]).abs().max().item() for k in weights)
    state = full_optimizer_state(backend.strategy.engine, backend.strategy.groups)["state"]
    m = 0.0
    if distributed.is_main():
        for i, entry in saved["optimizer"]["state"].items():
            for key, value in entry.items():
                m = max(m, (state[i][key].float() - value.float()).abs().max().item())
    return w, m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--load", default=None)
    ap.add_argument("--check", default=None)
    args = ap.parse_args()
    out, results = Path(args.out), {}
    for stage in (1, 2, 3):
        rec = {}
        backend = build(stage, "fp32", STEPS, seed=0)
        rec["losses"] = run_steps(backend, 0, HALF)
        ckpt = out / str(stage) / f"step_{HALF:07d}.pt"
        backend.save_state(ckpt, {"step": HALF})
        rec["losses"] += run_steps(backend, HALF, STEPS)
        pattern = args.load or args.check
        if pattern:
            fresh = build(stage, "fp32", STEPS, seed=1)      # its own initial weights differ
            path = Path(pattern.format(stage=stage))
            fresh.load_state(path)
            rec["restore"] = restore_differences(fresh, path)
            if args.load:
                rec["resumed_losses"] = run_steps(fresh, HALF, STEPS)
        results[stage] = rec
    if distributed.is_main():
        (out / "results.json").write_text(json.dumps(results, indent=1))
    distributed.barrier()
    distributed.leave_process_group()


if __name__ == "__main__":
    main()
    distributed.end_process(0)
