"""Training throughput: ``vit-accel bench --backend gpu --config vit-b16-ft``.

Times the backend's real ``train_step`` (uint8 images -> normalize -> forward -> loss ->
backward -> optimizer step) on synthetic data already on the device, after a warm-up, for
several providers of the same model side by side:

    ours      the backend as ``vit-accel train`` runs it (GPU: our Triton kernels as the recipe's gpu
              section says; CPU: cpu.precision and cpu.compile as the recipe sets or auto resolves them)
    eager     attention as explicit matmul + softmax, torch LayerNorm and GELU
    sdpa      torch scaled_dot_product_attention, torch LayerNorm and GELU
    compile   sdpa under torch.compile
    timm      timm's VisionTransformer of the same architecture (random init), under torch.compile

Every provider runs the same optimizer, precision and batch. With ``--rounds`` above 1 (the CPU
default) all providers are built and warmed up first, then timed in turns (ours, eager, ..., ours,
eager, ...), so a change in the machine's load hits each alike; the table gives the median and the
best round and each provider's median against the reference's (timm when measured) in the same run.
Reports images/s, step time, achieved FLOP/s (3 x analytic forward FLOPs per image: forward plus a
backward of twice the cost) against the device's peak (GPU: a table of dense 16-bit tensor-core
peaks; CPU: cores x clock x FLOP/cycle of its ISA, cpu_features.py; or --peak-tflops), the warm-up
time (compiles included), CPU time per step and, one provider at a time on a GPU, peak memory.
``--zero-memory`` instead reports per-GPU peak memory of ViT-L/16 under DeepSpeed ZeRO-3 versus
stage 0 (run it under torchrun to see the sharding pay off; one process shows the bookkeeping cost only).

``--backend cpu`` runs the same code on the CPU with tiny defaults, so CI exercises it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Union

import torch

from .bench_report import Result, device_peak, environment, format_table, load_average
from .config import Recipe, load_recipe, vit_options
from .model import PORTABLE_OPS

PROVIDERS = ("ours", "eager", "sdpa", "compile", "timm")
# op choices of the providers that are not the backend's own
_OPS = {"eager": dict(PORTABLE_OPS, attn_impl="eager"), "sdpa": dict(PORTABLE_OPS),
        "compile": dict(PORTABLE_OPS), "timm": dict(PORTABLE_OPS)}


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------

def timm_vit(cfg) -> torch.nn.Module:
    """timm's VisionTransformer with exactly the architecture of our ``ViTConfig`` (random init),
    LayerNorm eps and dropouts included: timm's ``drop_rate`` is the head's alone, its position and
    projection/MLP dropouts (ours all follow ``drop_rate``) have their own rates."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes,
                             embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                             qkv_bias=cfg.qkv_bias, global_pool=cfg.global_pool, fc_norm=cfg.fc_norm,
                             drop_rate=cfg.drop_rate, pos_drop_rate=cfg.drop_rate, proj_drop_rate=cfg.drop_rate,
                             attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
                             norm_layer=partial(torch.nn.LayerNorm, eps=cfg.layer_norm_eps))


def bench_recipe(recipe: Recipe, backend: str, batch: int, zero_stage: int = -1, provider: str = "ours",
                 precision: Optional[str] = None) -> Recipe:
    """One process, one micro-batch per optimizer step of ``batch`` images, no DeepSpeed unless asked.

    Only ``ours`` keeps the recipe's compile and precision settings (auto resolves them as in
    training): the bench compiles the other providers itself and gives them ``precision``, the one
    ``ours`` runs at.
    """
    r = copy.deepcopy(recipe)
    sec = getattr(r, backend)
    # under torchrun (--zero-memory) every process takes one micro-batch per step
    r.train.global_batch_size = batch * int(os.environ.get("WORLD_SIZE", "1"))
    sec.micro_batch_size = batch
    sec.gradient_accumulation = 0
    r.distributed.zero_stage = zero_stage
    r.distributed.offload_optimizer = False
    if backend == "gpu":
        r.gpu.compile = False          # the bench compiles per provider itself
    elif provider != "ours":
        r.cpu.compile = "false"
    if precision is not None and provider != "ours":
        sec.precision = precision
    return r


def build_provider_model(provider: str, recipe: Recipe, backend) -> torch.nn.Module:
    from .model import create_vit, vit_config

    opts = vit_options(recipe.model)
    if provider == "timm":  # the same architecture as ours, built by timm (pip install 'vit-accel[timm]')
        return torch.compile(timm_vit(vit_config(recipe.model.name, **opts)))
    opts.update(backend.model_options() if provider == "ours" else _OPS[provider])
    model = create_vit(recipe.model.name, **opts)
    return torch.compile(model) if provider == "compile" else model


def loop_backend(name: str, recipe: Recipe):
    """The CPU or GPU backend: the bench times their shared step loop, which keeps its model and
    batches on ``CPUBackend.device`` (not a member of the general backend seam)."""
    from .backends import backend_class
    from .backends.cpu import CPUBackend

    backend = backend_class(name)(recipe)
    assert isinstance(backend, CPUBackend), name
    return backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Live:
    """A provider ready to step: its backend (model, optimizer) and its synthetic batch on the device."""
    provider: str
    backend: object
    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    warmup_s: float


def time_steps(live: _Live, steps: int) -> tuple:
    """(seconds, CPU seconds) per training step over ``steps`` steps (CUDA events on GPUs)."""
    dev = live.backend.device
    _sync(dev)
    cpu0 = time.process_time()
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            live.backend.train_step(live.images, live.labels, live.lr)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / steps, (time.process_time() - cpu0) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        live.backend.train_step(live.images, live.labels, live.lr)
    return (time.perf_counter() - t0) / steps, (time.process_time() - cpu0) / steps


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()   # compiled graphs of the previous provider hold memory
    except Exception:
        pass


def prepare(provider: str, recipe: Recipe, backend_name: str, batch: int, warmup: int,
            precision: Optional[str]) -> Union[_Live, Result]:
    """Build the provider's backend and model, make its batch, run the warm-up steps (compiles);
    a provider that cannot be built here (timm missing, a kernel that cannot build) comes back as a
    skipped Result that says why."""
    r = bench_recipe(recipe, backend_name, batch, provider=provider, precision=precision)
    backend = loop_backend(backend_name, r)
    dev = backend.device
    try:
        model = build_provider_model(provider, r, backend)
    except Exception as e:
        return Result(provider, note=f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    backend.setup(model)
    g = torch.Generator(device="cpu").manual_seed(0)
    size = r.model.img_size
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(dev)
    labels = torch.randint(0, r.model.num_classes, (batch,), generator=g).to(dev)
    live = _Live(provider, backend, images, labels, r.optim.lr * 1e-3, 0.0)
    t0 = time.perf_counter()
    for _ in range(warmup):
        backend.train_step(images, labels, live.lr)
    _sync(dev)
    live.warmup_s = time.perf_counter() - t0
    return live


def measure(providers: List[str], recipe: Recipe, backend_name: str, batch: int, warmup: int, steps: int,
            rounds: int, peak: Optional[float], precision: Optional[str]) -> List[Result]:
    """Each provider's images/s; ``rounds`` > 1: all built and warmed up first, then timed in turns,
    round by round. ``rounds`` 1: one provider at a time (on a GPU, with its own peak memory)."""
    from .model import count_macs, vit_config

    flops = 3 * 2 * count_macs(vit_config(recipe.model.name, **vit_options(recipe.model)))   # fwd + 2x fwd for bwd
    results = {}
    lives = {}
    for p in providers:
        live = prepare(p, recipe, backend_name, batch, warmup, precision)
        if isinstance(live, Result):      # skipped, with the reason
            results[p] = live
            continue
        lives[p] = (live, [], [])
        if rounds <= 1:
            dev = live.backend.device
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _time_into(lives[p], steps)
            results[p] = _result(lives.pop(p), batch, flops, peak, backend_name)
            if dev.type == "cuda":
                results[p].peak_memory_gib = torch.cuda.max_memory_allocated(dev) / 2 ** 30
            del live
            _release(dev)
    for _ in range(rounds if lives else 0):
        for entry in lives.values():
            _time_into(entry, steps)
    for p in list(lives):
        results[p] = _result(lives.pop(p), batch, flops, peak, backend_name)
    _release(torch.device("cpu"))
    return [results[p] for p in providers]


def _time_into(entry, steps: int) -> None:
    live, seconds, cpu_seconds = entry
    sec, cpu = time_steps(live, steps)
    seconds.append(sec)
    cpu_seconds.append(cpu)


def _result(entry, batch: int, flops: float, peak: Optional[float], backend_name: str) -> Result:
    live, seconds, cpu_seconds = entry
    sec = statistics.median(seconds)
    tflops = flops * batch / sec / 1e12
    return Result(live.provider, images_per_second=batch / sec, step_ms=sec * 1e3, tflops=tflops,
                  mfu=tflops / peak if peak else None, best_images_per_second=batch / min(seconds),
                  warmup_s=live.warmup_s, rounds=[batch / t for t in seconds],
                  cpu_s_per_step=statistics.median(cpu_seconds) if backend_name == "cpu" else None)


def with_ratios(results: List[Result]) -> str:
    """Set each result's median images/s over the reference's (timm when measured, else the first
    measured provider); returns the reference's name."""
    measured = [r for r in results if r.images_per_second]
    if not measured:
        return ""
    ref = next((r for r in measured if r.provider == "timm"), measured[0])
    for r in measured:
        r.ratio = r.images_per_second / ref.images_per_second
    return ref.provider


def zero_memory(recipe: Recipe, backend_name: str, batch: int, warmup: int, model_name: str) -> List[Result]:
    """Peak memory per process of ``model_name`` under ZeRO stage 0 and stage 3 (DeepSpeed)."""
    from .engine import distributed
    from .model import create_vit

    out = []
    for stage in (0, 3):
        r = bench_recipe(recipe, backend_name, batch, zero_stage=stage)
        r.model.name = model_name
        backend = loop_backend(backend_name, r)
        dev, world = backend.device, distributed.world_size()   # the backend joined the process group
        torch.manual_seed(0)
        opts = vit_options(r.model)
        opts.update(backend.model_options())
        backend.setup(create_vit(model_name, **opts))
        size = r.model.img_size
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
        labels = torch.randint(0, r.model.num_classes, (batch,), device=dev)
        live = _Live(f"zero-{stage}", backend, images, labels, r.optim.lr * 1e-3, 0.0)
        for _ in range(warmup):
            backend.train_step(images, labels, live.lr)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sec, _ = time_steps(live, 1)
        mem = None
        if dev.type == "cuda":
            peak = torch.tensor([torch.cuda.max_memory_allocated(dev)], dtype=torch.float64)
            mem = distributed.all_reduce_sum(peak).item() / world / 2 ** 30   # mean over ranks
        out.append(Result(f"zero-{stage} x{world}", images_per_second=batch * world / sec,
                          step_ms=sec * 1e3, peak_memory_gib=mem,
                          note="" if mem is not None else "memory: n/a (no CUDA)"))
        del backend, images, labels, live
        _release(dev)
    return out


# ---------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------

def run_bench(args) -> int:
    from .backends import resolve_backend
    from .engine import distributed

    name = resolve_backend(args.backend)       # BackendUnavailable -> one line, exit 2
    if name == "ipu":
        print("vit-accel bench: measures the cpu and gpu backends; choose --backend gpu or cpu", file=sys.stderr)
        return 2
    on_gpu = name == "gpu"
    recipe = load_recipe(args.config, args.overrides)
    if args.model:
        recipe.model.name = args.model
    batch = args.batch or (recipe.gpu.micro_batch_size if on_gpu else 4)
    steps = args.steps or (20 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    rounds = args.rounds or (1 if on_gpu else 3)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    precision = getattr(recipe, name).precision
    if not on_gpu:   # every provider runs what cpu.precision resolves to (auto: by the CPU's bf16)
        from .backends.cpu_choice import choose_precision

        precision = choose_precision(precision, zero=bool(args.zero_memory)).value
    peak, peak_from = device_peak(device, precision, args.peak_tflops)
    load_start = load_average()

    if args.zero_memory:
        model = args.model or "vit-l16"
        results = zero_memory(recipe, name, args.batch or (8 if on_gpu else 2), warmup, model)
        title = f"ZeRO memory: {model}, micro-batch {args.batch or (8 if on_gpu else 2)}, {precision}"
        reference = ""
    else:
        providers = [p.strip() for p in args.providers.split(",")] if args.providers else (
            list(PROVIDERS) if on_gpu else ["ours", "compile", "timm"])
        bad = [p for p in providers if p not in PROVIDERS]
        if bad:
            print(f"vit-accel bench: unknown provider {bad[0]!r}; choose from {', '.join(PROVIDERS)}",
                  file=sys.stderr)
            return 2
        results = measure(providers, recipe, name, batch, warmup, steps, rounds, peak, precision)
        reference = with_ratios(results)
        model = recipe.model.name
        title = (f"{model} {recipe.model.img_size}px, micro-batch {batch}, {precision}, {rounds} round(s) of {steps} "
                 f"steps after {warmup} warm-up")
    env = environment(device)
    env["load_average_start"], env["load_average_end"] = load_start, load_average()
    if distributed.is_main():
        unit = "TFLOP/s" if on_gpu else "GFLOP/s"
        shown = "-" if peak is None else (f"{peak:g} TFLOP/s" if on_gpu else f"{peak * 1e3:.0f} GFLOP/s")
        print(f"vit-accel bench --backend {name}: {title}  [{env['device']}, torch {env['torch']}]")
        if env.get("cpu"):
            print(f"cpu: {env['cpu']}")
        print(f"peak: {shown} = {peak_from}")
        print(f"load average (1, 5, 15 min): {load_start} at start, {env['load_average_end']} at end")
        print(format_table(results, unit=unit, reference=reference))
        if args.json:
            payload = {"backend": name, "config": recipe.name, "model": model, "img_size": recipe.model.img_size,
                       "batch": batch, "steps": steps, "warmup": warmup, "rounds": rounds, "precision": precision,
                       "peak_tflops": peak, "peak_source": peak_from, "reference": reference,
                       "zero_memory": bool(args.zero_memory), "environment": env,
                       "results": [asdict(r) for r in results]}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="training throughput (images/s, FLOP/s against the peak, memory)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vit-b16-ft", help="recipe name or YAML path (model, precision, optimizer)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--backend", default="gpu", choices=["auto", "cpu", "gpu", "ipu"])
    p.add_argument("--model", default=None, help="variant override, e.g. vit-l16")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: the recipe's gpu one; cpu: 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20; cpu: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; cpu: 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds, providers in turns (default 1: one provider at a time; cpu: 3)")
    p.add_argument("--providers", default=None,
                   help=f"comma list from {','.join(PROVIDERS)} (default: all on gpu; ours,compile,timm on cpu)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak (default: known GPUs' 16-bit peak; the CPU's cores x clock x FLOP/cycle)")
    p.add_argument("--zero-memory", action="store_true", help="ViT-L/16 peak memory, ZeRO-3 vs stage 0")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_bench)
