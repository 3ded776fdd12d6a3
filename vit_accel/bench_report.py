"""What `vit-accel bench` prints and records: the device's peak, the result table, the environment."""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets.
# Matched against torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),          # SXM5 ("H100 80GB HBM3")
    ("A100", 312.0),
)


@dataclass
class Result:
    provider: str
    images_per_second: Optional[float] = None    # median over the rounds
    step_ms: Optional[float] = None              # median over the rounds
    tflops: Optional[float] = None               # achieved, at the median
    mfu: Optional[float] = None                  # tflops / the device's peak
    peak_memory_gib: Optional[float] = None
    note: str = ""
    best_images_per_second: Optional[float] = None
    ratio: Optional[float] = None                # median images/s / the reference provider's, same run
    warmup_s: Optional[float] = None             # the untimed first steps, torch.compile included
    cpu_s_per_step: Optional[float] = None       # CPU: process CPU time (all threads) per step
    rounds: List[float] = field(default_factory=list)   # images/s of each round


def peak_tflops_for(device_name: str) -> Optional[float]:
    for key, tf in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tf
    return None


def device_peak(device: torch.device, precision: str, given: Optional[float]) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s, where it comes from): ``--peak-tflops``, the GPU table (16-bit recipes), or the
    CPU's cores x clock x FLOP/cycle at the run's precision."""
    if given is not None:
        return given, "--peak-tflops"
    if device.type == "cuda":
        if precision not in ("bf16", "fp16"):
            return None, "unknown for fp32 (the table holds 16-bit tensor-core peaks; pass --peak-tflops)"
        tf = peak_tflops_for(torch.cuda.get_device_name(device))
        return tf, "datasheet (bench_report.PEAK_TFLOPS)" if tf else "unknown GPU (pass --peak-tflops)"
    from .backends import cpu_features

    pk = cpu_features.peak(precision)
    return (pk.gflops / 1e3 if pk.gflops else None), pk.source


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: List[Result], unit: str = "TFLOP/s", reference: str = "") -> str:
    """One row per provider; ``unit`` "GFLOP/s" prints the achieved rate in GFLOP/s (CPUs)."""
    scale = 1e3 if unit == "GFLOP/s" else 1.0
    ratio = f"x {reference}" if reference else "ratio"
    head = (f"{'provider':<10} {'images/s':>9} {'best':>8} {'step ms':>9} {unit:>8} {'of peak':>7} {ratio:>8} "
            f"{'warm-up s':>9} {'CPU s/step':>10} {'peak GiB':>8}  note")
    lines = [head, "-" * len(head)]
    for r in results:
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        rate = None if r.tflops is None else r.tflops * scale
        lines.append(f"{r.provider:<10} {_fmt(r.images_per_second, '.1f'):>9} {_fmt(r.best_images_per_second, '.1f'):>8} "
                     f"{_fmt(r.step_ms, '.1f'):>9} {_fmt(rate, '.1f' if scale > 1 else '.3f'):>8} {mfu:>7} "
                     f"{_fmt(r.ratio, '.2f'):>8} {_fmt(r.warmup_s, '.1f'):>9} {_fmt(r.cpu_s_per_step, '.3f'):>10} "
                     f"{_fmt(r.peak_memory_gib, '.2f'):>8}  {r.note}")
    return "\n".join(lines)


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints), where the OS has them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "date": time.strftime("%Y-%m-%d"), "load_average_start": load_average()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        from .backends import cpu_features

        env["device"] = f"cpu ({torch.get_num_threads()} threads)"
        env["cpu"] = cpu_features.describe()
    for mod in ("triton", "deepspeed", "timm"):
        m = sys.modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", "?")
    return env
