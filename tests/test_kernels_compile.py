"""Every Triton kernel compiles for an H100/H200 (sm_90), checked on a machine without a GPU.

The interpreter runs the kernels' arithmetic on the CPU; it does not lower them. Triton's
own compiler and ptxas (inside the triton wheel) do, with no driver: tools/compile_kernels.py
calls the real launchers at ViT shapes, records each launch, and compiles it with the
specialization Triton's runtime would use on the GPU, for every autotune config. These tests
read its JSON table: what the GPU would run must fit the target, use tensor cores, load
memory 128 bits at a time, and leave the autotuner a configuration that does not spill.
"""
import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "compile_kernels.py"


def _inputs_key() -> str:
    """What the table is a function of: the kernels, the tool, triton's version and the target."""
    h = hashlib.sha256(("triton %s cuda:90" % version("triton")).encode())
    for f in [TOOL] + sorted((ROOT / "vit_accel_kernels").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """The tool's table. Compiling takes a minute or more: a table compiled from the same inputs
    (kept in build/, keyed by their hash) is reused; any change to a kernel compiles afresh."""
    kept = ROOT / "build" / "compile_kernels" / ("sm90-%s.json" % _inputs_key())
    if kept.exists():
        return subprocess.CompletedProcess([], 0, "reused " + str(kept), ""), json.loads(kept.read_text())
    tmp = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # compile for real, not from an earlier cache
    p = subprocess.run([sys.executable, str(TOOL), "--target", "cuda:90", "--json", str(tmp / "t.json")],
                       env=env, capture_output=True, text=True, timeout=1200)
    table = json.loads((tmp / "t.json").read_text()) if (tmp / "t.json").exists() else None
    if p.returncode == 0 and table is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.with_suffix(".tmp").write_text(json.dumps(table))
        os.replace(kept.with_suffix(".tmp"), kept)
    return p, table


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(sm90):
    p, table = sm90
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = table["rows"]
    assert len(rows) >= 150 and not [r for r in rows if "error" in r or r["problems"]]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "ln_fwd", "ln_bwd", "gelu_fwd", "gelu_bwd"}
    assert all(r["regs"] > 0 for r in rows), "a row without a ptxas register count"


@pytest.mark.slow
def test_half_precision_attention_runs_on_tensor_cores(sm90):
    rows = [r for r in sm90[1]["rows"] if r["kernel"].startswith("attn") and not r["case"].startswith("fp32")]
    assert rows and all(r["mma"] in ("wgmma", "mma") for r in rows)
    # Hopper's warpgroup MMA in the configs with 64-row tiles and 4 warps, the autotuner's first choice
    assert all(r["mma"] == "wgmma" for r in rows if r["config"].startswith("M=64 N=64 w=4"))


@pytest.mark.slow
def test_memory_bound_kernels_load_128_bits_at_a_time(sm90):
    rows = [r for r in sm90[1]["rows"] if r["kernel"].startswith(("ln_", "gelu_"))]
    assert rows and all(r["vector_bits"] == 128 and r["spill"] == 0 for r in rows)


@pytest.mark.slow
def test_autotuner_has_a_spill_free_config_for_every_bf16_shape(sm90):
    groups = {}
    for r in sm90[1]["rows"]:
        if r["kernel"].startswith("attn") and r["case"].startswith("bf16"):
            groups.setdefault((r["kernel"], r["case"]), []).append(r)
    assert len(groups) == 15  # 3 kernels x 5 shapes (ViT-B, ViT-L 384, ViT-H/14 d80, d32, d128)
    for key, configs in groups.items():
        assert any(c["spill"] == 0 and c["regs"] <= 255 for c in configs), key


@pytest.mark.slow
def test_fp32_attention_tunes_over_tiles_that_do_not_spill(sm90):
    rows = [r for r in sm90[1]["rows"] if r["kernel"].startswith("attn") and r["case"].startswith("fp32")]
    assert {r["kernel"] for r in rows} == {"attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"}
    assert all(r["spill"] == 0 for r in rows), [(r["kernel"], r["config"], r["spill"]) for r in rows if r["spill"]]
    # and only those: the half-precision tiles are pruned away for fp32 inputs
    assert all(int(r["config"].split()[0][2:]) <= 64 and int(r["config"].split()[1][2:]) <= 32 for r in rows)


def test_bad_target_is_a_usage_error():
    p = subprocess.run([sys.executable, str(TOOL), "--target", "rocm"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "cuda:90" in p.stderr


def test_unknown_kernel_label_is_a_usage_error():
    p = subprocess.run([sys.executable, str(TOOL), "--only", "attn_fwd,softmax"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "softmax" in p.stderr and "attn_fwd" in p.stderr


def test_unknown_triton_version_fails_loudly():
    """The tool reads Triton internals: on a version it was not checked on it must stop, not pass vacuously."""
    code = ("import sys, runpy, triton; triton.__version__ = '3.99.0'; "
            f"sys.argv = [{str(TOOL)!r}, '--quick']; runpy.run_path({str(TOOL)!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIT_ACCEL_ANY_TRITON")}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "triton 3.99.0 is not a version this tool knows" in p.stderr, p.stderr[-2000:]
