"""cpu.precision and cpu.compile: what auto picks and prints, the compiled training step against the
eager one, exact resume of a compiled run, and the eager fallback where no C++ compiler works."""
from __future__ import annotations

import json

import pytest
import torch

from vit_accel.backends import cpu_choice, cpu_features
from vit_accel.backends.cpu_choice import choose_compile, choose_precision
from vit_accel.config import ConfigError, load_recipe
from vit_accel.engine.trainer import train

# depth 1 at batch 16: a step of a few milliseconds; 1.6 GFLOP of training in 6 steps
TINY = ["model.depth=1", "train.global_batch_size=16", "cpu.micro_batch_size=16", "data.workers=0",
        "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=3", "train.keep_checkpoints=0",
        "schedule.total_steps=6", "schedule.warmup_steps=2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits"))


def _recipe(data_root, *extra):
    return load_recipe("vit-ti-digits", TINY + [f"data.root={data_root}", *extra], backends=["cpu"])


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def _weights(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step_{step:07d}.pt", weights_only=True)["model"]


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    here = choose_precision("auto", zero=False)
    assert here.value == ("bf16" if cpu_features.native_bf16() else "fp32"), here
    for caps, value, feature in (({"avx512_bf16": True}, "bf16", "avx512_bf16"),
                                 ({"amx_bf16": True, "avx512_bf16": True}, "bf16", "amx_bf16"),
                                 ({"avx512_f": True, "avx2": True}, "fp32", "no avx512_bf16 or amx_bf16")):
        monkeypatch.setattr(cpu_features, "capabilities", lambda caps=caps: caps)   # another CPU's report
        got = choose_precision("auto", zero=False)
        assert got.value == value and feature in got.reason, got
    # DeepSpeed has no autocast: auto stays fp32 under ZeRO; a setting is kept as it is
    assert choose_precision("auto", zero=True).value == "fp32"
    assert choose_precision("bf16", zero=True).value == "bf16" and choose_precision("fp32", zero=False).value == "fp32"


def test_auto_compile_compiles_runs_that_repay_it(monkeypatch):
    if cpu_features.compiler_problem():
        pytest.skip(cpu_features.compiler_problem())
    monkeypatch.setattr(cpu_features, "peak", lambda precision, threads=None: cpu_features.Peak(332.0, "2 cores"))
    default = load_recipe("vit-ti-digits", [], backends=["cpu"])          # 600 steps x 64: 14.1 TFLOP, 43 s at 332
    got = choose_compile("auto", default, "bf16", 1, zero=False)
    assert got.value == "true" and "14.1 TFLOP" in got.reason and "43 s" in got.reason, got
    # the same run on 4 processes does a quarter of the work each: under the threshold
    assert choose_compile("auto", default, "bf16", 4, zero=False).value == "false"
    short = _recipe("unused")
    got = choose_compile("auto", short, "bf16", 1, zero=False)
    assert got.value == "false" and f"under the {cpu_choice.AUTO_COMPILE_SECONDS:.0f} s" in got.reason, got
    epochs = load_recipe("vit-ti-digits", ["schedule.epochs=300", "schedule.total_steps=0"], backends=["cpu"])
    assert choose_compile("auto", epochs, "bf16", 1, zero=False).value == "true"
    assert choose_compile("true", short, "bf16", 1, zero=False).value == "true"
    assert choose_compile("false", default, "bf16", 1, zero=False).value == "false"
    assert choose_compile("true", default, "bf16", 2, zero=True).value == "false"     # DeepSpeed's own step


def test_compile_setting_takes_yaml_booleans_and_auto():
    assert load_recipe("vit-ti-digits", ["cpu.compile=true"]).cpu.compile == "true"
    from vit_accel.config import _build, CPUConfig   # a recipe file's `compile: false` is YAML's boolean

    assert _build(CPUConfig, {"compile": False}, "cpu").compile == "false"
    with pytest.raises(ConfigError, match="cpu.compile: 'maybe' is not one of auto, true, false"):
        load_recipe("vit-ti-digits", ["cpu.compile=maybe"])
    with pytest.raises(ConfigError, match="cpu.precision: 'fp16' is not one of auto, fp32, bf16"):
        load_recipe("vit-ti-digits", ["cpu.precision=fp16"])


def test_without_a_cxx_compiler_the_run_says_so_and_trains_eager(tmp_path, data_root, capsys):
    from torch._inductor import config as inductor_config

    cpu_features.compiler_problem.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),)}):
            summary = train(_recipe(data_root, "cpu.compile=true", "schedule.total_steps=2",
                                    "schedule.warmup_steps=1"), "cpu",
                            run_dir=str(tmp_path / "run"), progress=False)
    finally:
        cpu_features.compiler_problem.cache_clear()
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("cpu: precision"))
    assert "compile false (" in line and "C++ compiler" in line and "training runs eager" in line, line
    assert summary["steps"] == 2


@pytest.mark.slow
def test_compiled_step_trains_like_eager_and_resumes_exactly(tmp_path, data_root, capsys):
    """The loss curve of a compiled run is the eager one up to rounding; a compiled run stopped and
    resumed (dropout on: its RNG restarts from the checkpoint) ends with the uninterrupted weights."""
    if cpu_features.compiler_problem():
        pytest.skip(cpu_features.compiler_problem())
    train(_recipe(data_root, "cpu.compile=false"), "cpu", run_dir=str(tmp_path / "eager"), progress=False)
    train(_recipe(data_root, "cpu.compile=true"), "cpu", run_dir=str(tmp_path / "compiled"), progress=False)
    out = capsys.readouterr().out
    assert "compile false (cpu.compile)" in out and "compile true (cpu.compile)" in out
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 6
    assert max(abs(a - b) / a for a, b in zip(eager, compiled)) < 0.02, (eager, compiled)

    dropout = ["cpu.compile=true", "model.drop_rate=0.1"]
    train(_recipe(data_root, *dropout), "cpu", run_dir=str(tmp_path / "whole"), progress=False)
    train(_recipe(data_root, *dropout), "cpu", run_dir=str(tmp_path / "split"), progress=False, stop_after=3)
    train(_recipe(data_root, *dropout), "cpu", run_dir=str(tmp_path / "split"), resume="auto", progress=False)
    a, b = _weights(tmp_path / "whole", 6), _weights(tmp_path / "split", 6)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
