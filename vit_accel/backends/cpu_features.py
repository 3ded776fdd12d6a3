"""What this CPU can do, as torch sees it: vector ISA, native bf16, cores, clock, peak FLOP/s, a C++ compiler.

Every number says where it comes from, so the CPU backend can print why its ``auto`` settings
chose what they chose and ``vit-accel bench`` can state the peak it measures against:

    ISA          torch.backends.cpu.get_cpu_capability() (the kernels torch dispatches to: AVX2, AVX512, ...)
    features     torch.cpu.get_capabilities() (cpuinfo: avx512_bf16, amx_bf16, physical cores, vendor)
    clock        /sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq, else "cpu MHz" of /proc/cpuinfo
    FLOP/cycle   vector lanes of the ISA x 2 FMA pipes x 2 (multiply + add); AMD Zen 3/4 (family 25)
                 run 512-bit instructions on 256-bit pipes; bf16 dot products (AVX512_BF16) do two
                 products per fp32 lane; an AMX-BF16 tile unit does 1,024 bf16 FLOP per cycle (Intel)

Only x86 has a table; elsewhere the peak is unknown unless given (``--peak-gflops``).
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

# fp32 lanes per vector instruction of torch's dispatch ISA
_LANES = {"AVX512": 16, "AVX2": 8, "DEFAULT": 4}
_FMA_PIPES = 2
_AMX_BF16_FLOP_PER_CYCLE = 1024


def capabilities() -> Dict[str, Any]:
    """torch.cpu.get_capabilities() (torch >= 2.9), else {}."""
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    try:
        return dict(get()) if get is not None else {}
    except Exception:  # an exotic CPU cpuinfo cannot read
        return {}


def isa() -> str:
    """The vector ISA torch's CPU kernels dispatch to ("AVX512", "AVX2", "DEFAULT", ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "unknown"


def native_bf16() -> Optional[str]:
    """The CPU feature that computes bf16 natively (``amx_bf16``, ``avx512_bf16``), or None.

    oneDNN runs bf16 on any AVX-512 core by converting to fp32 (``torch.ops.mkldnn.
    _is_mkldnn_bf16_supported()`` is True there); only these features make bf16 faster than fp32.
    """
    caps = capabilities()
    for feature in ("amx_bf16", "avx512_bf16"):
        if caps.get(feature):
            return feature
    return None


def _cpu_family() -> Optional[int]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu family"):
                return int(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


def clock_ghz() -> Tuple[Optional[float], str]:
    """(GHz, where it was read): cpufreq's maximum, else the "cpu MHz" a VM's /proc/cpuinfo reports."""
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return khz / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1e3, "/proc/cpuinfo cpu MHz"
    except (OSError, ValueError):
        pass
    return None, "unknown"


def cores(threads: Optional[int] = None) -> int:
    """Physical cores the run's threads can use: min(torch threads, physical cores)."""
    threads = threads or torch.get_num_threads()
    physical = capabilities().get("num_physical_cores") or os.cpu_count() or 1
    return max(1, min(threads, int(physical)))


def flop_per_cycle(precision: str) -> Tuple[Optional[int], str]:
    """Peak FLOP per cycle per core at ``precision`` ("fp32" or "bf16"), and how it was derived."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no table for {platform.machine()}"
    name, caps = isa(), capabilities()
    if name not in _LANES:
        return None, f"no table for ISA {name}"
    lanes, how = _LANES[name], f"{name} {_LANES[name]} fp32 lanes"
    if name == "AVX512" and "AMD" in str(caps.get("cpu_name", "")).upper() and _cpu_family() == 25:
        lanes, how = 8, f"{name} on 256-bit pipes (AMD family 25)"
    fp32 = lanes * _FMA_PIPES * 2
    how += f" x {_FMA_PIPES} FMA pipes x 2"
    if precision != "bf16":
        return fp32, how
    feature = native_bf16()
    if feature == "amx_bf16":
        return _AMX_BF16_FLOP_PER_CYCLE, "amx_bf16 tiles"
    if feature == "avx512_bf16":
        return 2 * fp32, how + " x 2 (avx512_bf16 dot products)"
    return fp32, how + " (bf16 converted to fp32: no native bf16)"


@dataclass
class Peak:
    gflops: Optional[float]
    source: str           # one line: cores x clock x FLOP/cycle, each with its origin


def peak(precision: str, threads: Optional[int] = None) -> Peak:
    """The CPU's peak GFLOP/s at ``precision`` for this process's threads."""
    n = cores(threads)
    ghz, clock_from = clock_ghz()
    per_cycle, how = flop_per_cycle(precision)
    if ghz is None or per_cycle is None:
        return Peak(None, f"unknown ({how if per_cycle is None else 'clock ' + clock_from})")
    return Peak(n * ghz * per_cycle,
                f"{n} cores (torch threads, physical cores) x {ghz:.2f} GHz ({clock_from}) x {per_cycle} "
                f"FLOP/cycle ({how})")


def describe() -> str:
    """One line: what torch sees of this CPU."""
    caps = capabilities()
    bf16 = native_bf16()
    return (f"{caps.get('cpu_name') or platform.processor() or platform.machine()}, ISA {isa()} "
            f"(torch.backends.cpu.get_cpu_capability()), "
            f"{'native bf16: ' + bf16 if bf16 else 'no native bf16 (no avx512_bf16 / amx_bf16)'}, "
            f"{caps.get('num_physical_cores', os.cpu_count())} physical cores, {torch.get_num_threads()} torch threads")


@functools.lru_cache(maxsize=None)
def compiler_problem() -> Optional[str]:
    """None when torch.compile's C++ compiler (inductor's, honouring $CXX) builds a file here, else why not."""
    try:
        from torch._inductor import cpp_builder

        cxx = cpp_builder.get_cpp_compiler()
    except Exception as e:  # no compiler on the search path (inductor raises its own error types)
        return f"torch.compile finds no C++ compiler ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        try:
            p = subprocess.run([cxx, str(src), "-o", str(Path(d) / "probe")], capture_output=True, text=True,
                               timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"the C++ compiler {cxx} does not run ({e})"
        if p.returncode != 0:
            return f"the C++ compiler {cxx} fails on an empty program ({(p.stderr or p.stdout).strip()[:160]})"
    return None
