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

from vit_accel.bench import PROVIDERS, timm_vit
from vit_accel.bench_report import Result, format_table, peak_tflops_for
from vit_accel.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "vit-ti-digits", "--set", "model.depth=1"]


def test_timm_provider_is_our_exact_architecture():
    """The timm provider (and tools/bench_model_cpu.py) build timm's VisionTransformer from our config:
    with our weights it computes our logits, LayerNorm eps and average pooling included."""
    pytest.importorskip("timm")
    from vit_accel.model import create_vit, vit_config

    kw = dict(img_size=32, patch_size=8, depth=2, num_classes=7, global_pool="avg", layer_norm_eps=1e-12)
    torch.manual_seed(0)
    ours = create_vit("vit-ti16", **kw).eval()
    with torch.no_grad():
        ours.head.weight.normal_()
    theirs = timm_vit(vit_config("vit-ti16", **kw)).eval()
    theirs.load_state_dict(ours.state_dict())
    assert theirs.norm.eps == 1e-12
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    # the same dropouts (timm's drop_rate alone would drop before the head only): the same work per step

    drop = dict(drop_rate=0.1, attn_drop_rate=0.05, drop_path_rate=0.2)
    t, o = ({n: getattr(m, "p", getattr(m, "drop_prob", None)) for n, m in model.named_modules()}
            for model in (timm_vit(vit_config("vit-ti16", **drop, **kw)), create_vit("vit-ti16", **drop, **kw)))
    for name in ("pos_drop", "blocks.1.attn.attn_drop", "blocks.1.attn.proj_drop", "head_drop"):
        assert t[name] == o[name] > 0, name
    assert t["blocks.1.mlp.drop1"] == t["blocks.1.mlp.drop2"] == o["blocks.1.mlp.drop"]
    assert t["blocks.1.drop_path1"] == pytest.approx(o["blocks.1.drop_path"]) == 0.2


def test_peak_table_matches_device_names():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Tesla T4") is None


def test_table_shows_missing_values_as_dashes():
    text = format_table([Result("ours", 100.0, 10.0, 1.5, 0.25, 3.0), Result("timm", note="skipped: no timm")])
    lines = text.splitlines()
    assert "25.0%" in lines[2] and "100.0" in lines[2] and "1.500" in lines[2]
    assert lines[3].split()[:6] == ["timm", "-", "-", "-", "-", "-"] and "skipped" in lines[3]
    # the CPU prints its rate in GFLOP/s
    assert "GFLOP/s" in format_table([Result("ours", 100.0, 10.0, 0.0865)], unit="GFLOP/s").splitlines()[0]
    assert "86.5" in format_table([Result("ours", 100.0, 10.0, 0.0865)], unit="GFLOP/s").splitlines()[2]


def test_bench_on_cpu_measures_each_provider_in_rounds(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backend", "cpu", *TINY, "--providers", "eager,sdpa", "--batch", "2", "--steps", "1",
               "--warmup", "1", "--rounds", "3", "--peak-tflops", "1.0", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eager" in printed and "sdpa" in printed and "images/s" in printed and "x eager" in printed
    assert "load average" in printed and "peak: 1000 GFLOP/s = --peak-tflops" in printed
    data = json.loads(out.read_text())
    assert data["backend"] == "cpu" and data["batch"] == 2 and data["model"] == "vit-ti16" and data["rounds"] == 3
    assert data["precision"] in ("fp32", "bf16")     # cpu.precision auto, resolved for every provider
    assert [r["provider"] for r in data["results"]] == ["eager", "sdpa"]
    for r in data["results"]:
        assert r["images_per_second"] > 0 and r["step_ms"] > 0 and len(r["rounds"]) == 3
        # the median round and the best one
        assert r["images_per_second"] == pytest.approx(sorted(r["rounds"])[1])
        assert r["best_images_per_second"] == pytest.approx(max(r["rounds"]))
        # TFLOP/s = 3 x forward FLOPs per image x images/s; MFU against the given peak
        assert r["tflops"] == pytest.approx(r["mfu"] * 1.0)
        assert r["peak_memory_gib"] is None           # no CUDA: no allocator statistics
        assert r["cpu_s_per_step"] > 0 and r["warmup_s"] > 0
    eager, sdpa = data["results"]
    assert data["reference"] == "eager" and eager["ratio"] == 1.0
    assert sdpa["ratio"] == pytest.approx(sdpa["images_per_second"] / eager["images_per_second"])
    env = data["environment"]
    assert env["torch"] == torch.__version__ and len(env["load_average_start"]) == 3
    assert torch.backends.cpu.get_cpu_capability() in env["cpu"]


def test_cpu_peak_names_where_each_number_comes_from():
    from vit_accel.backends import cpu_features

    pk = cpu_features.peak("fp32")
    if pk.gflops is None:
        pytest.skip(f"no peak table for this CPU: {pk.source}")
    assert "cores" in pk.source and "GHz (" in pk.source and "FLOP/cycle (" in pk.source
    assert torch.backends.cpu.get_cpu_capability() in pk.source
    bf16 = cpu_features.peak("bf16")
    # native bf16 doubles (avx512_bf16) or multiplies (amx_bf16) the fp32 rate; without it bf16 is converted
    assert (bf16.gflops > pk.gflops) == (cpu_features.native_bf16() is not None)


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
    from vit_accel.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    assert "ours,compile,timm on cpu" in bench.format_help()


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
