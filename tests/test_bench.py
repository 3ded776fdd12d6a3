"""`vit-accel bench`: the throughput benchmark, run for real on the CPU with a tiny model."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_accel.bench import PROVIDERS, Result, format_table, peak_tflops_for, timm_name
from vit_accel.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "vit-ti-digits", "--set", "model.depth=1"]


def test_timm_names_for_our_variants():
    assert timm_name("vit-b16", 224) == "vit_base_patch16_224"
    assert timm_name("vit-ti16", 224) == "vit_tiny_patch16_224"
    assert timm_name("vit-l16", 384) == "vit_large_patch16_384"
    assert timm_name("vit-h14", 224) == "vit_huge_patch14_224"
    with pytest.raises(ValueError, match="no timm name"):
        timm_name("vit-x16", 224)


def test_peak_table_matches_device_names():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Tesla T4") is None


def test_table_shows_missing_values_as_dashes():
    text = format_table([Result("ours", 100.0, 10.0, 1.5, 0.25, 3.0), Result("timm", note="skipped: no timm")])
    lines = text.splitlines()
    assert "25.0%" in lines[2] and "100.0" in lines[2]
    assert lines[3].split()[:6] == ["timm", "-", "-", "-", "-", "-"] and "skipped" in lines[3]


def test_bench_on_cpu_measures_each_provider(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backend", "cpu", *TINY, "--providers", "eager,sdpa", "--batch", "2", "--steps", "2",
               "--warmup", "1", "--peak-tflops", "1.0", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eager" in printed and "sdpa" in printed and "images/s" in printed
    data = json.loads(out.read_text())
    assert data["backend"] == "cpu" and data["batch"] == 2 and data["model"] == "vit-ti16"
    assert [r["provider"] for r in data["results"]] == ["eager", "sdpa"]
    for r in data["results"]:
        assert r["images_per_second"] > 0 and r["step_ms"] > 0
        # TFLOP/s = 3 x forward FLOPs per image x images/s; MFU against the given peak
        assert r["tflops"] == pytest.approx(r["mfu"] * 1.0)
        assert r["peak_memory_gib"] is None           # no CUDA: no allocator statistics
    assert data["environment"]["torch"] == torch.__version__


def test_bench_rejects_unknown_provider(capsys):
    assert main(["bench", "--backend", "cpu", *TINY, "--providers", "ours,fast"]) == 2
    assert "unknown provider 'fast'; choose from ours, eager" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_bench_gpu_without_cuda_exits_2_with_one_line(capsys):
    assert main(["bench", "--backend", "gpu", "--config", "vit-b16-ft"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and "--backend cpu" in err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero_memory_mode_runs_deepspeed_in_one_process(tmp_path):
    """--zero-memory builds ZeRO-0 and ZeRO-3 engines in one process without a launcher."""
    out = tmp_path / "zm.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore::FutureWarning",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions")))
    p = subprocess.run([sys.executable, "-m", "vit_accel", "bench", "--backend", "cpu", *TINY, "--zero-memory",
                        "--model", "vit-ti16", "--batch", "2", "--warmup", "1", "--json", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["zero_memory"] is True
    assert [r["provider"] for r in data["results"]] == ["zero-0 x1", "zero-3 x1"]
    assert all(r["images_per_second"] > 0 for r in data["results"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none present)")
def test_bench_on_gpu_reports_mfu_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backend", "gpu", *TINY, "--set", "model.depth=2", "--providers", "ours,sdpa,compile",
               "--batch", "32", "--steps", "3", "--warmup", "2", "--peak-tflops", "989", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    for r in data["results"]:
        assert r["images_per_second"] > 0 and r["peak_memory_gib"] > 0 and 0 < r["mfu"] < 1, r


def test_providers_list_is_what_the_help_promises():
    assert PROVIDERS == ("ours", "eager", "sdpa", "compile", "timm")


def test_bench_on_cpu_has_a_timm_provider(tmp_path):
    """timm is in the test environment: its provider is measured beside ours, not skipped."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backend", "cpu", "--config", "vit-ti-digits", "--set", "model.depth=1",
               "--set", "model.img_size=32", "--model", "vit-ti16", "--providers", "sdpa,timm", "--batch", "2",
               "--steps", "1", "--warmup", "1", "--json", str(out)])
    assert rc == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"sdpa", "timm"}
    assert rows["timm"]["images_per_second"] > 0, rows["timm"].get("note")
