"""Every Triton kernel compiles for an H100/H200 (sm_90), checked on a machine without a GPU.

The interpreter runs the kernels' arithmetic on the CPU; it does not lower them. Triton's
own compiler and ptxas (inside the triton wheel) do, with no driver: tools/compile_kernels.py
builds each kernel at the launch configurations the launchers use (every attention
autotune config, fp32/fp16/bf16, head_dim 32..128, LayerNorm widths 192..1280) and checks
shared memory against the target's limit.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "compile_kernels.py"


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier cache
    p = subprocess.run([sys.executable, str(TOOL), "--target", "cuda:90"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    done = re.search(r"(\d+) of (\d+) compiled for cuda:90", p.stdout)
    assert done and done.group(1) == done.group(2) and int(done.group(2)) >= 60, p.stdout[-2000:]
    for label in ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "ln_fwd", "ln_bwd", "gelu_fwd", "gelu_bwd"):
        assert re.search(r"^ok +%s " % label, p.stdout, re.M), label


def test_bad_target_is_a_usage_error():
    p = subprocess.run([sys.executable, str(TOOL), "--target", "rocm"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "cuda:90" in p.stderr
