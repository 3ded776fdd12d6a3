"""tools/gpu_check.sh runs only on a GPU host, where a broken line costs device time: here its
syntax is checked, every test path and CLI command it names must exist, and its dry run (the same
set-up and imports, one short case per step, the interpreter instead of the GPU) passes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_script_parses():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_every_test_path_it_names_exists():
    named = set(re.findall(r"\btests/[\w/]*(?:\.py)?", SCRIPT.read_text()))
    assert {"tests/test_kernels_attention.py", "tests/test_gpu.py", "tests/test_timm_parity.py",
            "tests/bench/test_bench_kernels.py"} <= named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, "tools/gpu_check.sh names paths that do not exist: %s" % missing


def test_the_bench_commands_it_runs_parse():
    import shlex

    from vit_accel.cli import build_parser

    text = SCRIPT.read_text().replace("\\\n", " ")  # join continued lines
    dry, real = [shlex.split(a) for a in re.findall(r"^\s*BENCH=\((.*)\)$", text, re.M)]  # --dry-run's first
    commands = [shlex.split(line.split("-m vit_accel", 1)[1]) for line in text.splitlines() if "-m vit_accel " in line]
    assert [c[:2] for c in commands] == [["bench", "${BENCH[@]}"], ["bench-data", "${DATA[@]}"]]
    dry, real = (build_parser().parse_args(["bench"] + a) for a in (dry, real))  # argparse exits on a bad option
    assert real.backend == "gpu" and real.config == "vit-b16-ft" and real.steps > real.warmup > 0
    assert dry.backend == "cpu" and dry.config == real.config
    dry_data, real_data = [shlex.split(a) for a in re.findall(r"^\s*DATA=\((.*)\)$", text, re.M)]
    dry_data, real_data = (build_parser().parse_args(["bench-data"] + a + commands[1][2:]) for a in (dry_data, real_data))
    assert real_data.pipelines == ["train", "gpu-decode"] and real_data.device == "cuda" and real_data.corpus > 0
    assert dry_data.device == "cpu" and dry_data.pipelines == real_data.pipelines


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "gpu_check: 0 step(s) failed" in p.stdout
    for step in ("tests", "bench-kernels", "bench-vit-b16", "bench-data-gpu"):
        assert "exit 0" in p.stdout.split(f"== {step} ", 1)[1].split("\n", 2)[1], p.stdout
    tests_log = (tmp_path / "tests.log").read_text()
    assert re.search(r"\b[1-9]\d* passed", tests_log) and " failed" not in tests_log, tests_log[-2000:]
    for record in ("bench-vit-b16.json", "bench-data-gpu.json"):
        assert json.loads((tmp_path / record).read_text()), f"{record}: the step wrote no results"
