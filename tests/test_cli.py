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


def test_eval_says_which_backend_auto_chose(tmp_path, capsys):
    from vit_accel.backends import resolve_backend

    assert main(["eval", "--config", "vit-ti-digits", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert f"vit-accel eval: --backend auto chose {resolve_backend('auto')}" in err and "no such file" in err


def test_train_says_in_one_line_that_it_does_not_pipeline(capsys):
    assert main(["train", "--config", "vit-ti-digits", "--set", "pipeline.stages=[patch_embed]", "--print-config"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train does not pipeline" in err[0] and "pipeline.*" in err[0]
    assert main(["train", "--config", "vit-ti-digits", "--print-config"]) == 0
    assert capsys.readouterr().err == ""      # the recipe's own pipeline section (for `plan`) is no news


def test_a_reader_that_goes_away_is_no_traceback():
    """`vit-accel configs | head -1`: the pipe closes before the output is written."""
    p = subprocess.Popen([sys.executable, "-m", "vit_accel", "configs"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()                      # before the command has imported anything
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_configs_help_and_recipe_checks_answer_without_loading_torch(tmp_path):
    """`vit-accel configs`, a command's --help, --print-config and a recipe's errors do not load torch
    (0.4 s instead of 2-3 s); the commands that train, evaluate or read files still do."""
    code = """if True:
        import contextlib, io, sys
        from vit_accel.cli import main
        def run(*argv):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(argv))
                except SystemExit as e:
                    code = e.code
            return code, out.getvalue() + err.getvalue()
        results = [run("configs"), run("train", "--help"), run("eval", "--help"),
                   run("train", "--config", "vit-ti-digits", "--print-config"),
                   run("train", "--config", "vit-ti-digits", "--print-config", "--set", "model.nme=vit-s16"),
                   run("train", "--config", "vit-ti-digits", "--print-config", "--set", "data.rand_augment=rand-x9")]
        import vit_accel
        assert vit_accel.VARIANTS["vit-ti16"][0] == 192  # the variants table needs no torch either
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm", "deepspeed"))
        for code, text in results:
            print(code, repr(text[-300:]))
        print("loaded:", loaded)
        print(vit_accel.create_vit("vit-ti16", num_classes=3).head.out_features)  # the package's names load on use
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    codes = [int(x.split()[0]) for x in lines[:6]]
    assert codes == [0, 0, 0, 0, 2, 2], p.stdout
    assert "vit-ti-digits" in lines[0] and "--resume" in lines[1] and "--checkpoint" in lines[2]
    assert "model.nme" in lines[4] and "rand_augment" in lines[5]
    assert lines[6] == "loaded: []", p.stdout
    assert lines[7] == "3"


def test_top_level_help_still_lists_every_command(capsys):
    from vit_accel.cli import EXTERNAL_COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    external = {fn[len("add_"):-len("_parser")].replace("_", "-") for _, fn in EXTERNAL_COMMANDS}
    assert external == {"convert", "inspect", "make-shards", "bench-data", "plan", "bench"}
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line[4] != " "}
    assert external | {"train", "eval", "predict", "configs", "report"} <= listed, listed
