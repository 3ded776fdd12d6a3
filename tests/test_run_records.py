"""What a run records beyond loss and accuracy: bad samples (key, shard) and fp16 skipped steps, with exact resume.

The fp16 loop is the GPU backend's; here it runs on the CPU (torch's GradScaler and fp16 autocast
work on "cpu"), through a GPU backend whose device is the CPU.
"""
import json
from pathlib import Path

import pytest
import torch

from digit_tars import write_digit_tars
from vit_accel.backends.gpu import GPUBackend
from vit_accel.backends.precision import LossScaledFP16
from vit_accel.config import load_recipe
from vit_accel.engine import trainer

SMALL = ["model.depth=1", "train.global_batch_size=16", "cpu.micro_batch_size=16", "gpu.micro_batch_size=8",
         "data.workers=1", "train.log_every=1", "train.eval_every=0", "train.eval_batch_size=64",
         "gpu.attn_impl=sdpa", "gpu.norm_impl=torch", "gpu.mlp_impl=torch"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _records(rd: Path):
    return [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_bad_samples_recorded_with_key_and_shard(tmp_path, capsys):
    train = write_digit_tars(tmp_path / "train", "train", [30, 30], bad={0: ["broken_train"]}, split="train")
    val = write_digit_tars(tmp_path / "val", "val", [20, 20], bad={1: ["broken_val"]})
    recipe = load_recipe("vit-ti-digits", SMALL + ["data.source=shards", "model.num_classes=10",  # plain tars
                                                   f"data.train_shards={train}",
                                                   f"data.val_shards={val}", "schedule.total_steps=5",
                                                   "schedule.warmup_steps=1", "data.max_bad_fraction=0.05"],
                         backends=["cpu"])
    rd = tmp_path / "run"
    summary = trainer.train(recipe, "cpu", run_dir=str(rd), progress=False)
    assert summary["bad_samples"] == 1 and summary["val_bad_samples"] == 1
    (ex,), (vex,) = summary["bad_examples"], summary["val_bad_examples"]
    assert ex["key"] == "broken_train" and ex["shard"].endswith("train-0.tar") and ex["reason"]
    assert vex["key"] == "broken_val" and vex["shard"].endswith("val-1.tar")
    assert json.loads((rd / "summary.json").read_text())["bad_examples"] == [ex]
    logged = _records(rd)
    train_ex = [e for r in logged if r["kind"] == "train" for e in r.get("bad_examples", [])]
    assert train_ex == [ex]                   # logged once, in the interval it was met
    assert [e for r in logged if r["kind"] == "val" for e in r.get("val_bad_examples", [])] == [vex]
    out = capsys.readouterr().out
    assert "broken_train in" in out and "train-0.tar" in out


class CPUHostedGPU(GPUBackend):
    """The GPU backend with the CPU as its device: its fp16 loop, GradScaler and checkpoints, testable here."""

    init_scale = 2.0 ** 24      # large enough to overflow fp16 gradients for the first steps
    poison = False

    @classmethod
    def unavailable_reason(cls):
        return None

    def select_device(self):
        return torch.device("cpu")

    def setup(self, model):
        if self.poison:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))
        super().setup(model)
        self.precision = LossScaledFP16("cpu", torch.amp.GradScaler("cpu", init_scale=self.init_scale))


def _fp16(monkeypatch, data_root, *extra):
    monkeypatch.setattr(trainer, "create_backend", lambda name, recipe: CPUHostedGPU(recipe))
    # patch 8: 16 tokens an image, as fp16 matrix products are slow on a CPU (no fp16 units); the loss
    # scaler's work is the same at any size
    return load_recipe("vit-ti-digits", SMALL + ["gpu.precision=fp16", "model.patch_size=8",
                                                 f"data.root={data_root}", "schedule.total_steps=8",
                                                 "schedule.warmup_steps=1", "train.checkpoint_every=4",
                                                 "train.keep_checkpoints=0",
                                                 *extra], backends=["gpu"])


@pytest.mark.slow
def test_fp16_skipped_steps_counted_and_resume_restores_the_loss_scale(tmp_path, data_root, monkeypatch):
    recipe = _fp16(monkeypatch, data_root)
    full = trainer.train(recipe, "gpu", run_dir=str(tmp_path / "full"), progress=False)
    skipped = full["skipped_steps"]
    assert 0 < skipped < 8, skipped
    logged = [r for r in _records(tmp_path / "full") if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in logged][-1] == skipped and logged[0]["skipped_steps"] == 1
    ckpt = tmp_path / "full" / "checkpoints" / "step_0000004.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["grad_scaler"]["scale"] < CPUHostedGPU.init_scale   # halved at each overflow
    assert state["skipped_steps"]["total"] == min(skipped, 4)

    resumed = trainer.train(recipe, "gpu", run_dir=str(tmp_path / "resumed"), resume=str(ckpt), progress=False)
    assert resumed["skipped_steps"] == skipped   # a scale reset to 2**24 would skip again
    a = torch.load(tmp_path / "full" / "checkpoints" / "step_0000008.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "step_0000008.pt", weights_only=True)
    assert a["grad_scaler"] == b["grad_scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_consecutive_skips_stop_the_run_with_the_key(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(CPUHostedGPU, "poison", True)    # nan weights: every step overflows
    recipe = _fp16(monkeypatch, data_root, "train.max_skipped_steps=3")
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row skipped by the fp16 loss scaler .*"
                                                 r"train.max_skipped_steps 3"):
        trainer.train(recipe, "gpu", run_dir=str(tmp_path / "nan"), progress=False)


def test_a_run_directory_that_holds_a_run_is_continued_or_refused_never_mixed(tmp_path, data_root, capsys):
    from vit_accel.cli import main

    rd = tmp_path / "run"
    args = ["train", "--backend", "cpu", "--config", "vit-ti-digits", "--run-dir", str(rd), "--no-progress",
            "--set", f"data.root={data_root}", "--set", "schedule.total_steps=2", "--set", "schedule.warmup_steps=0",
            "--set", "data.workers=0"] + [x for kv in SMALL if not kv.startswith("data.workers") for x in ("--set", kv)]
    assert main(args) == 0
    before = (rd / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 2                                # the same command again: refused, nothing touched
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints up to step_0000002.pt and metrics.jsonl)" in err
    assert "--resume auto" in err and "another --run-dir" in err
    assert (rd / "metrics.jsonl").read_text() == before
    assert main(args + ["--resume", "auto"]) == 0         # continuing it is allowed (already complete here)
    assert "nothing to train" in capsys.readouterr().out
    assert (rd / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("failure", [None, RuntimeError("protobuf is too new")], ids=["not-installed", "broken"])
def test_tensorboard_absent_is_quiet_and_broken_is_said(tmp_path, monkeypatch, capsys, failure):
    import sys
    import types

    from vit_accel.engine.runlog import RunLog

    if failure is None:
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # the import raises ImportError
    else:
        def broken(*args, **kwargs):
            raise failure

        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=broken))
    log = RunLog(tmp_path, total_steps=2, start_step=0, progress=False)
    log.write({"step": 1, "loss": 0.5})
    log.close()
    err = capsys.readouterr().err
    assert log.tb is None and json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.5
    if failure is None:
        assert err == ""
    else:
        assert "TensorBoard is installed but failed (RuntimeError: protobuf is too new)" in err
