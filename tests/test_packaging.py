"""What a user installs: the wheel (recipes inside, kernels under their own import name) and `make test`."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_make_decides_on_the_triton_interpreter_when_the_test_recipe_runs(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # a fresh clone: no .venv yet, so nothing about CUDA can be known when make starts
    out = subprocess.run(["make", "-n", "test", f"VENV={tmp_path / 'no-venv'}"], cwd=REPO, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "-m pytest" in ln)
    # the shell evaluates the probe in the recipe, with the venv's python, after the venv is built
    assert line.startswith("env $(") and "torch.cuda.is_available()" in line and "TRITON_INTERPRET=1" in line
    assert f"{tmp_path / 'no-venv'}/bin/python -c" in line
    venv_step = next(i for i, ln in enumerate(out.stdout.splitlines()) if "venv" in ln and "python3 -m venv" in ln)
    assert venv_step < out.stdout.splitlines().index(line)


def _copy_source(dst: Path) -> Path:
    """The source tree without build outputs, so building the wheel writes nothing into the repository."""
    anywhere = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".pytest_cache")
    top = {".venv", ".shim", "runs", "data", "build", "dist"}

    def ignore(folder, names):
        return set(anywhere(folder, names)) | (top & set(names) if Path(folder) == REPO else set())

    return Path(shutil.copytree(REPO, dst, ignore=ignore))


@pytest.mark.slow
def test_wheel_installs_recipes_and_kernels_and_trains_outside_the_repository(tmp_path):
    src = _copy_source(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # torch & co. come from this environment (read-only); only vit-accel itself is installed, non-editable.
    # A .pth line adds a path but runs no .pth files inside it, so the parent's editable install stays out.
    (site / "parent-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIT_ACCEL_CONFIGS")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    run = dict(cwd=str(tmp_path), env=env, text=True, capture_output=True, timeout=900)
    out = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--ignore-installed", str(src)], **run)
    assert out.returncode == 0, out.stdout + out.stderr

    record = next(site.glob("vit_accel-*.dist-info")) / "RECORD"
    files = [ln.split(",")[0] for ln in record.read_text().splitlines()]
    assert "vit_accel/configs/vit-ti-digits.yaml" in files and "vit_accel/configs/vit-b16-ft.yaml" in files
    assert "vit_accel_kernels/attention.py" in files
    assert not [f for f in files if f.startswith("kernels/")], "a top-level 'kernels' is another project's name"

    where = subprocess.run([str(py), "-c", "import vit_accel, vit_accel_kernels; print(vit_accel.__file__); "
                                           "print(vit_accel_kernels.__file__)"], **run)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout

    cli = str(venv / "bin" / "vit-accel")
    out = subprocess.run([cli, "configs"], **run)
    assert out.returncode == 0 and "vit-ti-digits" in out.stdout and "vit-b16-ft" in out.stdout, out.stderr
    out = subprocess.run([cli, "train", "--config", "vit-ti-digits", "--no-progress", "--run-dir", "run",
                          "--set", "data.root=data", "--set", "schedule.total_steps=5",
                          "--set", "schedule.warmup_steps=1", "--set", "train.log_every=5",
                          "--set", "data.workers=1", "--set", "model.depth=1"], **run)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "val top-1" in out.stdout and (tmp_path / "run" / "summary.json").exists()
