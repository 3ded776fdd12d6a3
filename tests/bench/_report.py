"""Timing and reporting helpers for the kernel microbenchmarks (tests/bench).

Results go to $VIT_ACCEL_BENCH_OUT (default build/bench/) as <name>.json and <name>.md,
and the markdown table is printed. Peaks are the ceilings measured on the lent machines
(device-to-device copy bandwidth, bf16 8192^3 matmul), so "% peak" is against what the
hardware was seen to do, not the datasheet.
"""
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

# (bytes/s, bf16 FLOP/s) measured ceilings; matched on the CUDA device name.
PEAKS = {"H200": (4.3e12, 800e12), "H100": (3.0e12, 800e12)}


def device_peaks(device):
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None, None


def time_ms(fn, device, warmup=5, rep=20):
    """Median wall time of fn() in ms: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Report:
    """Rows of one benchmark group; rate is TFLOP/s when flops are given, else GB/s."""

    def __init__(self, name, device):
        self.name, self.device = name, device
        self.peak_bw, self.peak_flops = device_peaks(device)
        self.rows = []

    def add(self, case, provider, mode, ms, flops=None, nbytes=None, note=""):
        row = {"case": case, "provider": provider, "mode": mode, "ms": ms, "note": note}
        if ms is not None and flops is not None:
            row["tflops"] = flops / ms / 1e9
            row["frac_peak"] = flops / (ms * 1e-3) / self.peak_flops if self.peak_flops else None
        if ms is not None and nbytes is not None:
            row["gbps"] = nbytes / ms / 1e6
            row["frac_peak"] = nbytes / (ms * 1e-3) / self.peak_bw if self.peak_bw else None
        self.rows.append(row)
        return row

    def markdown(self):
        lines = [
            f"### {self.name} on {_device_name(self.device)}",
            "",
            "| case | mode | provider | ms | TFLOP/s | GB/s | % peak | note |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
        for r in self.rows:
            frac = r.get("frac_peak")
            lines.append(
                f"| {r['case']} | {r['mode']} | {r['provider']} | {fmt(r['ms'], '%.3f')} | "
                f"{fmt(r.get('tflops'), '%.3g')} | {fmt(r.get('gbps'), '%.4g')} | "
                f"{fmt(frac * 100 if frac is not None else None, '%.0f%%')} | {r['note']} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir=None):
        out = Path(out_dir or os.environ.get("VIT_ACCEL_BENCH_OUT", "build/bench"))
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": _device_name(self.device),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "python": platform.python_version(),
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "peak_bytes_per_s": self.peak_bw,
            "peak_flops": self.peak_flops,
        }
        (out / f"{self.name}.json").write_text(json.dumps({"meta": meta, "rows": self.rows}, indent=2))
        table = self.markdown()
        (out / f"{self.name}.md").write_text(table)
        print("\n" + table)
        return out


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover
        return None
