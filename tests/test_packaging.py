"""What a user installs, the ways users install it.

- `python -m build` gives an sdist and a wheel holding the package, the kernels and the recipes.
- The kernels import as `vit_accel_kernels` from a wheel, a PEP 660 editable install, a legacy
  editable install (old setuptools: `setup.py develop`) and a plain checkout on PYTHONPATH.
- Nothing in the repository root shadows another project's import name (PyPI's `kernels`, which
  today's transformers depends on, broke `pip install -e .` when the kernels folder was `kernels/`).
- The wheel works in an environment that holds the current Hugging Face stack.
- `make test`: the Triton interpreter decided when it runs, either pass failing fails it, and the
  order of the pytest-xdist workers' shares (tests/conftest.py).

The fresh environments borrow torch & co. from this one through a `.pth` line (read-only: pip
never uninstalls a package outside the environment it installs into, and a `.pth` line runs no
`.pth` files inside the folder it adds, so this environment's editable install stays out).
"""
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from testkit import made_once, session_lock

REPO = Path(__file__).resolve().parent.parent
ROOT_IMPORT_NAMES = {"vit_accel", "vit_accel_kernels", "setup"}  # setup.py: the build shim


def test_make_decides_on_the_triton_interpreter_when_the_test_recipe_runs(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # a fresh clone: no .venv yet, so nothing about CUDA can be known when make starts
    out = subprocess.run(["make", "-n", "test", f"VENV={tmp_path / 'no-venv'}"], cwd=REPO, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "-m pytest" in ln and "--dist worksteal" in ln)
    # the shell evaluates the probe in the recipe, with the venv's python, after the venv is built
    assert line.startswith("env $(") and "torch.cuda.is_available()" in line and "TRITON_INTERPRET=1" in line
    assert f"{tmp_path / 'no-venv'}/bin/python -c" in line
    venv_step = next(i for i, ln in enumerate(out.stdout.splitlines()) if "venv" in ln and "python3 -m venv" in ln)
    assert venv_step < out.stdout.splitlines().index(line)


@pytest.mark.parametrize("main_ok, torch20_ok", [(True, True), (True, False), (False, True)])
def test_make_test_fails_when_either_pass_beside_the_other_fails(tmp_path, main_ok, torch20_ok):
    """The torch 2.0.1 pass runs in the background beside the main pass: its failure must fail
    `make test` as the main pass's does, and its output must be printed."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for stamp in ("stamp", "stamp20"):  # environments that are up to date, so nothing is installed
        (tmp_path / stamp).touch()
    py = tmp_path / "py"  # the lint passes; the main pass (--ignore=...) passes or fails
    py.write_text("#!/bin/sh\necho \"[$PYTHONDONTWRITEBYTECODE] $*\" >> %s\n"
                  "case \"$*\" in *--ignore=*) exit %d;; esac\nexit 0\n" % (tmp_path / "calls", 0 if main_ok else 4))
    py.chmod(0o755)
    args = ["make", "--no-print-directory", "test", f"STAMP={tmp_path / 'stamp'}", f"STAMP20={tmp_path / 'stamp20'}",
            f"LOG20={tmp_path / 'log20'}", "INTERP=", f"PY={py}", "TEST20_TRUST=true",
            "TEST20_IPU=" + ("echo torch20-ran" if torch20_ok else "sh -c 'echo torch20-ran; exit 3'")]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # as on a machine that turns bytecode caches off
    out = subprocess.run(args, cwd=REPO, env=env, text=True, capture_output=True, timeout=60)
    assert "torch20-ran" in out.stdout, out.stdout + out.stderr
    assert (out.returncode == 0) == (main_ok and torch20_ok), out.stdout + out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    (main_pass,) = [c for c in calls if "-m pytest" in c]
    # the test processes write bytecode caches; the IPU backend's own tests run in the torch 2.0.1 pass only;
    # the cluster tests run in the main pass
    assert all(c.startswith("[] ") for c in calls), calls
    assert "--ignore=tests/test_ipu.py" in main_pass and "--ignore=tests/test_distributed_exit.py" not in main_pass
    assert "test_cluster" not in main_pass and "--dist worksteal" in main_pass


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_the_heavy_modules_start_the_workers_shares(workers):
    """tests/conftest.py's order under pytest-xdist: each worker's share (of worksteal's sizes) starts
    with its heavy modules, which are spread over the shares; nothing is lost or reordered in a module."""
    from conftest import HEAVY_MODULES, heavy_first

    assert all((REPO / "tests" / name).is_file() for name in HEAVY_MODULES), HEAVY_MODULES
    rng = random.Random(workers)
    names = [f"test_light{i}.py" for i in range(12)] + list(HEAVY_MODULES)
    rng.shuffle(names)
    items = [SimpleNamespace(path=Path("tests") / name, n=k) for name in names for k in range(rng.randint(1, 9))]
    out = heavy_first(items, workers)
    assert sorted(map(id, out)) == sorted(map(id, items))
    for name in names:   # each module's items in their order
        assert [i.n for i in out if i.path.name == name] == [i.n for i in items if i.path.name == name]
    loads, start = [], 0
    for k in range(workers):   # worksteal: each idle worker gets the pending count // the workers left
        share = out[start:start + (len(out) - start) // (workers - k)]
        start += len(share)
        heavy = [i.path.name for i in share if i.path.name in HEAVY_MODULES]
        assert heavy == [i.path.name for i in share[:len(heavy)]], k   # its heavy modules first
        loads.append(sum(HEAVY_MODULES[n] for n in set(heavy)))
    assert sum(loads) == sum(HEAVY_MODULES.values())   # every heavy module whole in one share
    assert max(loads) - min(loads) <= max(HEAVY_MODULES.values())


def test_nothing_in_the_repository_root_shadows_another_projects_import_name():
    """Python puts the current folder first on sys.path while pip builds us: a root folder with an
    `__init__.py`, or a root `.py` file, is importable there under its name."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, text=True, capture_output=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    names = set()
    for f in tracked:
        top = f.split("/")[0]
        if f == top and top.endswith(".py"):
            names.add(top[:-3])
        elif f == f"{top}/__init__.py":
            names.add(top)
    assert names <= ROOT_IMPORT_NAMES, f"the repository root shadows import names {sorted(names - ROOT_IMPORT_NAMES)}"


def _copy_source(dst: Path) -> Path:
    """The source tree without build outputs, so building writes nothing into the repository."""
    anywhere = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".pytest_cache")
    top = {".venv", ".venv-torch20", "runs", "data", "build", "dist", ".whl", ".gl"}

    def ignore(folder, names):
        return set(anywhere(folder, names)) | (top & set(names) if Path(folder) == REPO else set())

    return Path(shutil.copytree(REPO, dst, ignore=ignore))


def _venv(path: Path, pip: bool = False) -> Path:
    """A new virtual environment that sees this one's packages after its own (read-only)."""
    args = [sys.executable, "-m", "venv", str(path)] + ([] if pip else ["--without-pip"])
    subprocess.run(args, check=True, timeout=300)
    py = path / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "parent-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def _pip_install(py, *args):
    """`pip install ARGS` in that interpreter's environment, without byte-compiling: a test imports a few
    modules of what it installs, and compiling all of transformers was most of that environment's install."""
    return [py, "-m", "pip", "install", "--no-compile", *args]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIT_ACCEL_CONFIGS")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", **extra)
    return env


def _run(args, cwd, env, timeout=900):
    return subprocess.run([str(a) for a in args], cwd=str(cwd), env=env, text=True, capture_output=True,
                          timeout=timeout)


def _ok(out):
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


def _pip_online(out) -> None:
    """Skip (naming why) when PyPI cannot be reached; any other pip failure fails the test."""
    text = out.stdout + out.stderr
    if out.returncode != 0 and any(s in text for s in ("NewConnectionError", "Temporary failure in name resolution",
                                                         "Network is unreachable", "No matching distribution")):
        pytest.skip("needs PyPI (pip could not reach it): " + text.strip().splitlines()[-1][:200])


def _where(py, cwd, env, *modules):
    """module -> the file it imports from, in that interpreter."""
    code = ("import importlib, json, sys; print(json.dumps({m: importlib.import_module(m).__file__ "
            "for m in sys.argv[1:]}))")
    return json.loads(_ok(_run([py, "-c", code, *modules], cwd, env)).strip().splitlines()[-1])


KERNEL_MODULES = ("vit_accel_kernels", "vit_accel_kernels.attention", "vit_accel_kernels.layer_norm",
                  "vit_accel_kernels.bias_gelu")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`python -m build`: the sdist and the wheel of a copy of this checkout (isolated build)."""

    def build(tmp):
        src = _copy_source(tmp / "src")
        out = _run([sys.executable, "-m", "build", "--outdir", tmp / "dist", src], tmp, _env())
        _pip_online(out)
        _ok(out)
        return [str(src), str(next((tmp / "dist").glob("*.whl"))), str(next((tmp / "dist").glob("*.tar.gz")))]

    return tuple(map(Path, made_once(tmp_path_factory, "package_build", build)))


@pytest.mark.slow
def test_build_gives_an_sdist_and_a_wheel_of_the_package_kernels_and_recipes(built):
    src, wheel, sdist = built
    recipes = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    files = zipfile.ZipFile(wheel).namelist()
    tops = {f.split("/")[0] for f in files}
    assert tops == {"vit_accel", "vit_accel_kernels", wheel.name.split("-")[0] + "-0.1.0.dist-info"}, tops
    assert sorted(f.split("/")[-1] for f in files if f.startswith("vit_accel/configs/")) == recipes
    assert {"vit_accel_kernels/attention.py", "vit_accel_kernels/layer_norm.py",
            "vit_accel_kernels/bias_gelu.py", "vit_accel/data/jpeg_region.c"} <= set(files)
    meta = next(f for f in files if f.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Name: vit-accel" in text and "Requires-Dist: torch>=2.0.1" in text

    names = tarfile.open(sdist).getnames()
    inner = {n.split("/", 1)[1] for n in names if "/" in n}
    assert {"pyproject.toml", "setup.py", "README.md", "configs/vit-ti-digits.yaml",
            "vit_accel_kernels/attention.py", "vit_accel/model.py"} <= inner
    extra = sorted(n for n in inner if n.split("/")[0] not in
                   {"vit_accel", "vit_accel_kernels", "configs", "vit_accel.egg-info"}
                   and n not in {"pyproject.toml", "setup.py", "setup.cfg", "README.md", "MANIFEST.in", "PKG-INFO"})
    assert not extra, f"the sdist holds more than the package, kernels and recipes: {extra[:10]}"


@pytest.mark.slow
def test_wheel_installs_the_recipes_and_kernels(built, tmp_path):
    """(The same wheel trains and reads an HF directory outside the repository in the Hugging Face
    stack's environment below.)"""
    _, wheel, _ = built
    py = _venv(tmp_path / "venv")
    site = Path(sysconfig.get_paths(vars={"base": str(tmp_path / "venv")})["purelib"])
    env = _env(PIP_NO_INDEX="1")
    _ok(_run(_pip_install(py, "-q", "--no-deps", "--ignore-installed", wheel), tmp_path, env))
    where = _where(py, tmp_path, env, "vit_accel", *KERNEL_MODULES)
    assert all(f.startswith(str(site)) for f in where.values()), where

    out = _ok(_run([tmp_path / "venv" / "bin" / "vit-accel", "configs"], tmp_path, env))
    assert "vit-ti-digits" in out and "vit-b16-ft" in out


def test_kernels_import_from_a_plain_checkout_on_pythonpath(tmp_path):
    """How tools/gpu_check.sh runs on a GPU host: no install, the checkout on PYTHONPATH."""
    py = _venv(tmp_path / "venv")
    env = _env(PYTHONPATH=str(REPO))
    where = _where(py, tmp_path, env, "vit_accel", *KERNEL_MODULES)
    assert all(f.startswith(str(REPO)) for f in where.values()), where
    out = _ok(_run([py, "-m", "vit_accel", "configs"], tmp_path, env))
    assert "vit-b16-ft" in out


@pytest.mark.slow
def test_legacy_editable_install_with_an_old_setuptools(tmp_path):
    """setuptools < 64 has no PEP 660 hook: pip falls back to `setup.py develop`, which puts the source
    folder on sys.path; the kernels and the recipes must be found from there too."""
    src = _copy_source(tmp_path / "src")
    py = _venv(tmp_path / "venv", pip=True)
    env = _env()
    out = _run(_pip_install(py, "-q", "--ignore-installed", "setuptools==63.4.3", "wheel==0.45.1"), tmp_path, env)
    _pip_online(out)
    _ok(out)
    out = _run(_pip_install(py, "--no-deps", "--no-build-isolation", "--ignore-installed", "-e", src), tmp_path, env)
    text = _ok(out)
    assert "setup.py develop" in text or "Running setup.py develop" in text or "egg-link" in out.stderr + text \
        or list((tmp_path / "venv").rglob("*.egg-link")), "pip did not take the legacy editable path"
    where = _where(py, tmp_path, env, "vit_accel", *KERNEL_MODULES)
    assert all(f.startswith(str(src)) for f in where.values()), where
    out = _ok(_run([tmp_path / "venv" / "bin" / "vit-accel", "configs"], tmp_path, env))
    assert "vit-ti-digits" in out and "vit-b16-ft" in out


@pytest.fixture(scope="module")
def hf_stack_venv(tmp_path_factory):
    """A fresh environment that already holds PyPI's `kernels` and the newest transformers and timm: one
    for the session (a test installs into it holding `session_lock(..., "hfstack-venv")`)."""
    py, seen = made_once(tmp_path_factory, "hfstack", _make_hf_stack_venv)
    return Path(py), _env(), seen


def _make_hf_stack_venv(tmp: Path):
    py = _venv(tmp / "venv", pip=True)
    env = _env()
    # torch and torchvision stay this environment's (newer ones would be several GB of CUDA wheels)
    pins = tmp / "pins.txt"
    pins.write_text("".join(f"{d}=={_version(d)}\n" for d in ("torch", "torchvision")))
    out = _run(_pip_install(py, "-q", "-c", pins, "--upgrade", "kernels", "transformers", "timm", "setuptools",
                            "wheel"), tmp, env)
    _pip_online(out)
    _ok(out)
    seen = {d: _venv_version(py, tmp, env, d) for d in ("kernels", "transformers", "timm", "huggingface_hub",
                                                        "setuptools")}
    print("hf stack seen:", seen)
    return str(py), seen


def _version(dist):
    from importlib.metadata import version

    return version(dist)


def _venv_version(py, cwd, env, dist):
    return _ok(_run([py, "-c", f"from importlib.metadata import version; print(version({dist!r}))"],
                    cwd, env)).strip()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["built-wheel", "source", "editable", "editable-no-build-isolation"])
def test_installs_next_to_the_current_hugging_face_stack(built, hf_stack_venv, tmp_path, tmp_path_factory, how):
    """`pip install` of the built wheel, `pip install --no-build-isolation .` and `pip install -e .` with and
    without build isolation (PEP 660: the environment's setuptools >= 64), where PyPI's `kernels` and the
    current transformers are installed: the builds that setuptools ran `kernels`' egg_info hook in."""
    py, env, seen = hf_stack_venv
    venv = py.parent.parent
    assert seen["kernels"], seen
    args, src = _pip_install(py, "-q", "--no-deps", "--force-reinstall"), None
    if how == "built-wheel":
        args += [built[1]]
    else:
        src = _copy_source(tmp_path / "src")
        args += ["--no-build-isolation"] if how in ("source", "editable-no-build-isolation") else []
        args += [src] if how == "source" else ["-e", src]
    with session_lock(tmp_path_factory, "hfstack-venv"):  # one install at a time in the shared environment
        _install_and_check(py, env, args, tmp_path, venv, how, src if how.startswith("editable") else None)


def _install_and_check(py, env, args, tmp_path, venv, how, src):
    out = _run(args, tmp_path, env)
    _pip_online(out)
    _ok(out)
    try:
        where = _where(py, tmp_path, env, "vit_accel", *KERNEL_MODULES, "kernels", "transformers")
        root = str(src or venv)
        assert all(where[m].startswith(root) for m in ("vit_accel",) + KERNEL_MODULES), where
        assert where["kernels"].startswith(str(venv)), where  # PyPI's kernels, not ours
        cli = venv / "bin" / "vit-accel"
        assert "vit-ti-digits" in _ok(_run([cli, "configs"], tmp_path, env))
        if how == "built-wheel":  # the longer checks once
            _train_and_inspect_hf(py, cli, tmp_path, env)
    finally:
        _run([py, "-m", "pip", "uninstall", "-q", "-y", "vit-accel"], tmp_path, env)


def _train_and_inspect_hf(py, cli, tmp_path, env):
    out = _ok(_run([cli, "train", "--config", "vit-ti-digits", "--no-progress", "--run-dir", "run",
                    "--set", "data.root=data", "--set", "schedule.total_steps=5", "--set", "schedule.warmup_steps=1",
                    "--set", "train.log_every=5", "--set", "data.workers=1", "--set", "model.depth=1"], tmp_path, env))
    assert "val top-1" in out
    # an HF directory written by this transformers release
    code = ("import sys, transformers as t; c = t.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,"
            " intermediate_size=128, image_size=32, patch_size=8, num_labels=3); "
            "t.ViTForImageClassification(c).save_pretrained(sys.argv[1])")
    _ok(_run([py, "-c", code, tmp_path / "hf"], tmp_path, env))
    out = _ok(_run([cli, "inspect", tmp_path / "hf"], tmp_path, env))
    assert "hf" in out and "3" in out, out
