"""Training throughput: ``vit-accel bench --backend gpu --config vit-b16-ft``.

Times the backend's real ``train_step`` (uint8 images -> normalize -> forward -> loss ->
backward -> optimizer step) on synthetic data already on the device, after a warm-up, for
several providers of the same model side by side:

    ours      the backend's ops (GPU: our Triton kernels as the recipe's gpu section says)
    eager     attention as explicit matmul + softmax, torch LayerNorm and GELU
    sdpa      torch scaled_dot_product_attention, torch LayerNorm and GELU
    compile   sdpa under torch.compile
    timm      timm's VisionTransformer of the same size (random init), under torch.compile

Reports images/s, step time, achieved TFLOP/s (3 x analytic forward FLOPs per image: forward
plus a backward of twice the cost), MFU against the device's dense 16-bit tensor peak (a small
table, or --peak-tflops), and peak memory. ``--zero-memory`` instead reports per-GPU peak
memory of ViT-L/16 under DeepSpeed ZeRO-3 versus stage 0 (run it under torchrun to see the
sharding pay off; one process shows the bookkeeping cost only).

``--backend cpu`` runs the same code on the CPU with tiny defaults, so CI exercises it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .config import Recipe, load_recipe, vit_options

PROVIDERS = ("ours", "eager", "sdpa", "compile", "timm")
# op choices of the providers that are not the backend's own
_OPS = {"eager": dict(attn_impl="eager", norm_impl="torch", mlp_impl="torch"),
        "sdpa": dict(attn_impl="sdpa", norm_impl="torch", mlp_impl="torch"),
        "compile": dict(attn_impl="sdpa", norm_impl="torch", mlp_impl="torch"),
        "timm": dict(attn_impl="sdpa", norm_impl="torch", mlp_impl="torch")}

# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets.
# Matched against torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),          # SXM5 ("H100 80GB HBM3")
    ("A100", 312.0),
)

_TIMM_SIZES = {"ti": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}


@dataclass
class Result:
    provider: str
    images_per_second: Optional[float] = None
    step_ms: Optional[float] = None
    tflops: Optional[float] = None
    mfu: Optional[float] = None
    peak_memory_gib: Optional[float] = None
    note: str = ""


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------

def peak_tflops_for(device_name: str) -> Optional[float]:
    for key, tf in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tf
    return None


def timm_name(variant: str, img_size: int) -> str:
    """Our variant name -> timm's model name (``vit-b16``, 224 -> ``vit_base_patch16_224``)."""
    body = variant[len("vit-"):]
    size = "".join(c for c in body if c.isalpha())
    patch = body[len(size):]
    if size not in _TIMM_SIZES or not patch.isdigit():
        raise ValueError(f"no timm name for variant {variant!r}")
    return f"vit_{_TIMM_SIZES[size]}_patch{patch}_{img_size}"


def timm_vit(cfg) -> torch.nn.Module:
    """timm's VisionTransformer with exactly the architecture of our ``ViTConfig`` (random init)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes,
                             embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                             qkv_bias=cfg.qkv_bias, global_pool=cfg.global_pool, fc_norm=cfg.fc_norm,
                             drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate,
                             drop_path_rate=cfg.drop_path_rate)


def bench_recipe(recipe: Recipe, backend: str, batch: int, zero_stage: int = -1) -> Recipe:
    """One process, one micro-batch per optimizer step of ``batch`` images, no DeepSpeed unless asked."""
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
    return r


def build_provider_model(provider: str, recipe: Recipe, backend) -> torch.nn.Module:
    from .model import create_vit, vit_config

    opts = vit_options(recipe.model)
    if provider == "timm":  # the same architecture as ours, built by timm (pip install 'vit-accel[timm]')
        return torch.compile(timm_vit(vit_config(recipe.model.name, **opts)))
    opts.update(backend.model_options() if provider == "ours" else _OPS[provider])
    model = create_vit(recipe.model.name, **opts)
    return torch.compile(model) if provider == "compile" else model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(backend, images, labels, lr: float, warmup: int, steps: int) -> float:
    """Seconds per training step after ``warmup`` untimed steps (CUDA events on GPUs)."""
    for _ in range(warmup):
        backend.train_step(images, labels, lr)
    dev = backend.device
    _sync(dev)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            backend.train_step(images, labels, lr)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        backend.train_step(images, labels, lr)
    return (time.perf_counter() - t0) / steps


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()   # compiled graphs of the previous provider hold memory
    except Exception:
        pass


def measure(provider: str, recipe: Recipe, backend_name: str, batch: int, warmup: int, steps: int,
            peak: Optional[float]) -> Result:
    from .backends import backend_class
    from .model import count_macs, vit_config

    r = bench_recipe(recipe, backend_name, batch)
    backend = backend_class(backend_name)(r)
    dev = backend.device
    try:
        model = build_provider_model(provider, r, backend)
    except Exception as e:   # timm missing, a kernel that cannot build here: say so, go on
        return Result(provider, note=f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    flops = 3 * 2 * count_macs(vit_config(r.model.name, **vit_options(r.model)))   # fwd + 2x fwd for bwd
    backend.setup(model)
    g = torch.Generator(device="cpu").manual_seed(0)
    size = r.model.img_size
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(dev)
    labels = torch.randint(0, r.model.num_classes, (batch,), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sec = time_steps(backend, images, labels, r.optim.lr * 1e-3, warmup, steps)
    ips = batch / sec
    tflops = flops * ips / 1e12
    res = Result(provider, images_per_second=ips, step_ms=sec * 1e3, tflops=tflops,
                 mfu=tflops / peak if peak else None,
                 peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None)
    del backend, model, images, labels
    _release(dev)
    return res


def zero_memory(recipe: Recipe, backend_name: str, batch: int, warmup: int, model_name: str) -> List[Result]:
    """Peak memory per process of ``model_name`` under ZeRO stage 0 and stage 3 (DeepSpeed)."""
    from .backends import backend_class
    from .engine import distributed
    from .model import create_vit

    out = []
    for stage in (0, 3):
        r = bench_recipe(recipe, backend_name, batch, zero_stage=stage)
        r.model.name = model_name
        backend = backend_class(backend_name)(r)
        dev, world = backend.device, distributed.world_size()   # the backend joined the process group
        torch.manual_seed(0)
        opts = vit_options(r.model)
        opts.update(backend.model_options())
        backend.setup(create_vit(model_name, **opts))
        size = r.model.img_size
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
        labels = torch.randint(0, r.model.num_classes, (batch,), device=dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sec = time_steps(backend, images, labels, r.optim.lr * 1e-3, warmup, 1)
        mem = None
        if dev.type == "cuda":
            peak = torch.tensor([torch.cuda.max_memory_allocated(dev)], dtype=torch.float64)
            mem = distributed.all_reduce_sum(peak).item() / world / 2 ** 30   # mean over ranks
        out.append(Result(f"zero-{stage} x{world}", images_per_second=batch * world / sec,
                          step_ms=sec * 1e3, peak_memory_gib=mem,
                          note="" if mem is not None else "memory: n/a (no CUDA)"))
        del backend, images, labels
        _release(dev)
    return out


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: List[Result]) -> str:
    head = f"{'provider':<12} {'images/s':>10} {'step ms':>9} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9}  note"
    lines = [head, "-" * len(head)]
    for r in results:
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        lines.append(f"{r.provider:<12} {_fmt(r.images_per_second, '.1f'):>10} {_fmt(r.step_ms, '.2f'):>9} "
                     f"{_fmt(r.tflops, '.3f'):>9} {mfu:>7} {_fmt(r.peak_memory_gib, '.2f'):>9}  {r.note}")
    return "\n".join(lines)


def environment(device: torch.device) -> Dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({torch.get_num_threads()} threads)"
    for mod in ("triton", "deepspeed", "timm"):
        m = __import__("sys").modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", "?")
    return env


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
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    precision = getattr(recipe, name).precision
    peak = args.peak_tflops
    if peak is None and on_gpu and precision in ("bf16", "fp16"):
        peak = peak_tflops_for(torch.cuda.get_device_name(device))
    env = environment(device)

    if args.zero_memory:
        model = args.model or "vit-l16"
        results = zero_memory(recipe, name, args.batch or (8 if on_gpu else 2), warmup, model)
        title = f"ZeRO memory: {model}, micro-batch {args.batch or (8 if on_gpu else 2)}, {precision}"
    else:
        providers = [p.strip() for p in args.providers.split(",")] if args.providers else (
            list(PROVIDERS) if on_gpu else ["ours", "eager", "sdpa"])
        bad = [p for p in providers if p not in PROVIDERS]
        if bad:
            print(f"vit-accel bench: unknown provider {bad[0]!r}; choose from {', '.join(PROVIDERS)}",
                  file=sys.stderr)
            return 2
        results = [measure(p, recipe, name, batch, warmup, steps, peak) for p in providers]
        model = recipe.model.name
        title = (f"{model} {recipe.model.img_size}px, micro-batch {batch}, {precision}, {steps} steps after "
                 f"{warmup} warm-up, peak {peak if peak else 'unknown'} TFLOP/s")
    if distributed.is_main():
        print(f"vit-accel bench --backend {name}: {title}  [{env['device']}, torch {env['torch']}]")
        print(format_table(results))
        if args.json:
            payload = {"backend": name, "config": recipe.name, "model": model, "img_size": recipe.model.img_size,
                       "batch": batch, "steps": steps, "warmup": warmup, "precision": precision,
                       "peak_tflops": peak, "zero_memory": bool(args.zero_memory), "environment": env,
                       "results": [asdict(r) for r in results]}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="training throughput (images/s, TFLOP/s, MFU, memory)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vit-b16-ft", help="recipe name or YAML path (model, precision, optimizer)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--backend", default="gpu", choices=["auto", "cpu", "gpu", "ipu"])
    p.add_argument("--model", default=None, help="variant override, e.g. vit-l16")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: the recipe's gpu one; cpu: 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; cpu: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; cpu: 1)")
    p.add_argument("--providers", default=None, help=f"comma list from {','.join(PROVIDERS)}")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--zero-memory", action="store_true", help="ViT-L/16 peak memory, ZeRO-3 vs stage 0")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_bench)
