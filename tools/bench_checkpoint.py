"""How long a checkpoint stops the training loop: synchronous against asynchronous saves, one run.

    python tools/bench_checkpoint.py [--model vit-b16] [--rounds 3] [--dir /tmp] [--json out.json]

Builds the model and AdamW on the CPU backend, takes one optimizer step (so the moments exist:
about 1 GB for ViT-B/16 in fp32), then saves through the backend's real path
(``Backend.save_state`` -> ``engine.saving``), ROUNDS times with ``train.async_checkpoint`` off, then on.
The stall is the time ``save_state`` keeps the caller: the whole write (torch.save, fsync, rename)
when synchronous; the host snapshot when asynchronous (the write then runs in a thread, timed
separately until it is on disk). Reports medians over the rounds and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vit_accel.backends.cpu import CPUBackend  # noqa: E402
from vit_accel.config import Recipe  # noqa: E402
from vit_accel.engine.saving import writing  # noqa: E402
from vit_accel.engine.trainer import build_model  # noqa: E402


def backend_with_state(model: str) -> CPUBackend:
    r = Recipe()
    r.model.name, r.optim.name, r.train.global_batch_size, r.cpu.micro_batch_size = model, "adamw", 2, 2
    backend = CPUBackend(r)
    backend.setup(build_model(r, backend))
    images = torch.randint(0, 255, (2, 3, r.model.img_size, r.model.img_size), dtype=torch.uint8)
    backend.train_step(images, torch.tensor([1, 2]), 1e-4)
    return backend


def saves(backend: CPUBackend, folder: Path, asynchronous: bool, rounds: int):
    """Per save: (seconds the caller waited, seconds until the file was on disk), one writer for all
    saves as in a run (an asynchronous writer reuses its host buffers from the second save on)."""
    out = []
    with writing(asynchronous) as writer:
        for i in range(rounds):
            path = folder / f"{'async' if asynchronous else 'sync'}-{i}.pt"
            t0 = time.perf_counter()
            backend.save_state(path, {"step": i})
            stall = time.perf_counter() - t0
            writer.wait()   # the training steps between two saves would run here
            out.append((stall, time.perf_counter() - t0, path.stat().st_size))
            path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-b16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoint is written")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    backend = backend_with_state(args.model)
    n_bytes = sum(t.numel() * t.element_size() for t in backend.model.state_dict().values())
    n_bytes += sum(v.numel() * v.element_size() for s in backend.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v))
    folder = Path(tempfile.mkdtemp(prefix="vit-accel-ckpt-bench-", dir=args.dir))
    try:
        times = {a: saves(backend, folder, a, args.rounds) for a in (False, True)}
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    size = times[False][0][2]
    med = {k: (statistics.median(s for s, _, _ in v), statistics.median(d for _, d, _ in v)) for k, v in times.items()}
    out = {"model": args.model, "state_bytes": n_bytes, "file_bytes": size, "rounds": args.rounds,
           "sync_stall_s": med[False][0], "async_stall_s": med[True][0], "async_on_disk_s": med[True][1],
           "stall_ratio_sync_over_async": med[False][0] / med[True][0], "torch": torch.__version__,
           "all_seconds": {("async" if k else "sync"): [[round(s, 3), round(d, 3)] for s, d, _ in v]
                           for k, v in times.items()},
           "python": platform.python_version(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "load_average": os.getloadavg()}
    print(f"{args.model} + AdamW: {n_bytes / 2 ** 30:.2f} GiB of state, {size / 2 ** 30:.2f} GiB file, "
          f"median of {args.rounds}")
    print(f"  synchronous   stall {med[False][0]:7.2f} s")
    print(f"  asynchronous  stall {med[True][0]:7.2f} s   (on disk after {med[True][1]:.2f} s)")
    print(f"  stall ratio sync / async: {out['stall_ratio_sync_over_async']:.1f}x   (load average "
          f"{out['load_average'][0]:.1f} on {out['cpus']} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
