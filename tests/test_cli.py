"""CLI: recipes listing, --print-config, clear exits for missing backends and bad input."""
import subprocess
import sys

import pytest

from vit_accel.cli import main


def test_configs_lists_recipes(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "vit-b16-ft " in out and "vit-ti-digits" in out and "81.22" in out


def test_print_config_resolves_overrides(capsys):
    assert main(["train", "--config", "vit-b16-ft", "--set", "optim.lr=0.01", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01" in out and "global_batch_size: 2176" in out


def test_unknown_key_exits_2_with_one_line(capsys):
    assert main(["train", "--config", "vit-ti-digits", "--set", "optim.lrr=1", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key optim.lrr" in err[0]


@pytest.mark.parametrize("backend,needle", [("gpu", "CUDA"), ("ipu", "PopTorch")])
def test_missing_backend_exits_2_without_traceback(backend, needle):
    import torch

    if backend == "gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    if backend == "ipu":
        try:
            import poptorch  # noqa: F401
            pytest.skip("PopTorch is installed")
        except ImportError:
            pass
    r = subprocess.run([sys.executable, "-m", "vit_accel", "train", "--backend", backend, "--config",
                        "vit-ti-digits"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr


def test_report_on_a_non_run_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
