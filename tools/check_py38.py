"""Static check that the IPU import path runs where PopTorch runs (Python 3.8, torch 2.0.1).

Poplar SDK 3.3/3.4 pin torch 2.0.1 and ship Python 3.8 (DESIGN.md decision 9). Two checks:
1. `vermin -t=3.8-` over every file the IPU backend imports: no 3.9+ syntax or stdlib calls.
2. No torch API newer than 2.0 at module level in those files (a line may use one inside a
   guarded function when it carries the marker `# torch>=2.x: guarded`).
If a Python 3.8 interpreter is on the machine, each file is also byte-compiled with it.
Exit code 0 when clean, 1 with one line per violation.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IPU_PATH = ["vit_accel/__init__.py", "vit_accel/__main__.py", "vit_accel/model.py", "vit_accel/hybrid.py",
            "vit_accel/config.py", "vit_accel/errors.py",
            "vit_accel/cli.py", "vit_accel/backends/__init__.py",
            "vit_accel/backends/base.py", "vit_accel/backends/pipeline.py", "vit_accel/backends/pipeline_cost.py",
            "vit_accel/backends/pipeline_report.py", "vit_accel/backends/pipeline_run.py",
            "vit_accel/backends/ipu.py", "vit_accel/backends/ipu_feed.py"]
IPU_DIRS = ["vit_accel/checkpoints", "vit_accel/data", "vit_accel/engine"]

# torch names that do not exist in torch 2.0.1
NEWER_TORCH = [r"torch\.nn\.attention\b", r"torch\.compiler\b", r"\bnn\.RMSNorm\b", r"F\.rms_norm\b",
               r"torch\.distributed\.pipelining\b", r"torch\.amp\.GradScaler\b", r"torch\.library\.custom_op\b",
               r"torch\.distributed\.tensor\b", r"torch\.nn\.functional\.rms_norm\b", r"torch\.export\b",
               r"\.register_fake\b", r"torch\.utils\.flop_counter\b", r"torch\.float8", r"torch\.uint16\b"]
MARKER = "torch>=2.x: guarded"


def files() -> list:
    """The IPU import path; a listed file or folder that no longer exists is an error, so a
    move cannot silently drop files from the check."""
    gone = [f for f in IPU_PATH + IPU_DIRS if not (ROOT / f).exists()]
    if gone:
        raise SystemExit(f"check_py38: listed but missing (update IPU_PATH / IPU_DIRS): {', '.join(gone)}")
    out = [ROOT / f for f in IPU_PATH]
    for d in IPU_DIRS:
        out += sorted((ROOT / d).glob("**/*.py"))
    return out


def check_torch_apis(paths) -> list:
    bad = []
    pat = re.compile("|".join(NEWER_TORCH))
    for p in paths:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pat.search(code) and MARKER not in line:
                bad.append(f"{p.relative_to(ROOT)}:{i}: torch API newer than 2.0.1: {line.strip()}")
    return bad


def check_vermin(paths) -> list:
    exe = Path(sys.executable).parent / "vermin"
    cmd = [str(exe) if exe.exists() else "vermin", "-t=3.8-", "--no-tips", "--violations", "--eval-annotations",
           "--backport", "dataclasses", "--backport", "typing"] + [str(p) for p in paths]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in (0,):
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        return ["vermin: " + ln for ln in lines] or [f"vermin exited {r.returncode}"]
    return []


def check_py38_compile(paths) -> list:
    # a real 3.8 binary, not a version-manager shim
    py38 = next((str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.8*/bin/python3.8"))), None)
    if not py38 and shutil.which("python3.8") and "shims" not in shutil.which("python3.8"):
        py38 = shutil.which("python3.8")
    if not py38:
        return []
    src = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f).read(), f, 'exec')\n"
    r = subprocess.run([py38, "-c", src] + [str(p) for p in paths], capture_output=True, text=True)
    return [] if r.returncode == 0 else ["python3.8 compile: " + (r.stderr.strip().splitlines() or ["?"])[-1]]


def main() -> int:
    paths = files()
    problems = check_torch_apis(paths) + check_vermin(paths) + check_py38_compile(paths)
    for p in problems:
        print(p)
    print(f"py38/torch-2.0 check: {len(paths)} files, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
