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


def test_the_bench_command_it_runs_is_a_cli_command():
    from vit_accel.cli import build_parser

    text = SCRIPT.read_text()
    commands = re.findall(r"-m vit_accel (\S+)", text)
    assert commands == ["bench"]
    args = build_parser().parse_args(["bench", "--backend", "gpu", "--config", "vit-b16-ft", "--steps", "20",
                                      "--warmup", "5", "--json", "x.json"])
    assert args.steps == 20 and args.warmup == 5
