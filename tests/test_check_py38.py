"""tools/check_py38.py: the IPU import path check cannot silently lose files."""
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "check_py38.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_py38", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_listed_path_exists_and_the_checkpoints_package_is_checked():
    mod = _load()
    names = {p.relative_to(mod.ROOT).as_posix() for p in mod.files()}
    assert {"vit_accel/checkpoints/__init__.py", "vit_accel/backends/pipeline_run.py", "vit_accel/model.py"} <= names


def test_a_listed_path_that_moved_is_an_error(monkeypatch):
    mod = _load()
    monkeypatch.setattr(mod, "IPU_PATH", mod.IPU_PATH + ["vit_accel/gone.py"])
    with pytest.raises(SystemExit, match="vit_accel/gone.py"):
        mod.files()
