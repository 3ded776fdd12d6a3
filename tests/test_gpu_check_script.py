"""tools/gpu_check.sh runs only on a GPU host, where a broken line costs device time: here its
syntax is checked and every test path and CLI command it names must exist."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_script_parses():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_every_test_path_it_names_exists():
    named = set(re.findall(r"\btests/[\w/]*(?:\.py)?", SCRIPT.read_text()))
    assert {"tests/test_kernels_attention.py", "tests/test_gpu.py", "tests/test_timm_parity.py", "tests/bench"} <= named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, "tools/gpu_check.sh names paths that do not exist: %s" % missing


def test_the_bench_commands_it_runs_parse():
    import shlex

    from vit_accel.cli import build_parser

    text = SCRIPT.read_text().replace("\\\n", " ")  # join continued lines
    commands = [shlex.split(line.split("-m vit_accel", 1)[1]) for line in text.splitlines() if "-m vit_accel " in line]
    assert [c[0] for c in commands] == ["bench", "bench-data"]
    args = build_parser().parse_args(commands[0])  # argparse exits (a failure here) on an unknown option
    assert args.backend == "gpu" and args.config == "vit-b16-ft" and args.steps > args.warmup > 0
    data = build_parser().parse_args(commands[1])
    assert data.pipelines == ["train", "gpu-decode"] and data.device == "cuda" and data.corpus > 0
