"""End to end on the CPU backend with the bundled digits: learning, kill + resume, report."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from vit_accel.cli import main
from vit_accel.engine.runlog import lr_curve
from vit_accel.engine.saving import marker_path

REPO = Path(__file__).resolve().parent.parent
# a small, fast version of the embedded default
TINY = ["--set", "model.depth=2", "--set", "train.global_batch_size=32", "--set", "cpu.micro_batch_size=16",
        "--set", "data.workers=2", "--set", "train.log_every=5"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _run(args, cwd, env=None):
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "vit_accel"] + args, cwd=cwd, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_digits_run_beats_chance_and_writes_the_run_dir(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rd = tmp_path / "run"
    code = main(["train", "--config", "vit-ti-digits", "--run-dir", str(rd), "--no-progress",
                 "--set", f"data.root={data_root}", "--set", "schedule.total_steps=150",
                 "--set", "schedule.warmup_steps=10", "--set", "train.eval_every=75",
                 "--set", "train.checkpoint_every=75"] + TINY)
    assert code == 0
    # what cpu.precision / cpu.compile "auto" chose, and why, is printed at start
    out = capsys.readouterr().out.splitlines()
    chosen = next(x for x in out if x.startswith("cpu: precision "))
    assert "compile " in chosen and "(auto: " in chosen, chosen
    data = next(x for x in out if x.startswith("data: "))  # and how the loader decodes
    assert "worker(s) per process" in data and "JPEG decoding: " in data, data
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["val_top1"] > 0.5, summary  # chance is 0.1
    assert summary["steps"] == 150 and summary["backend"] == "cpu"
    for key in ("val_top5", "train_loss", "images_per_second", "wall_seconds", "recipe", "versions"):
        assert key in summary
    records = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 151, 5))
    assert train[-1]["loss"] < train[0]["loss"]
    assert sum(r["kind"] == "val" for r in records) == 2
    # curves.png draws the schedule's rate of every step from step 0, not from the first log line
    steps, lrs = lr_curve(rd, train)
    assert steps[0] == 0 and len(lrs) == 150 and lrs[0] == pytest.approx(0.02 * 1e-3)
    assert all(r["lr"] == pytest.approx(lrs[r["step"] - 1]) for r in train)   # step k logs step k - 1's rate
    assert (rd / "curves.png").stat().st_size > 10_000
    (rd / "curves.png").unlink()
    assert main(["report", str(rd)]) == 0
    assert (rd / "curves.png").exists()

    # the training checkpoint evaluates and predicts like any other checkpoint
    ckpt = str(rd / "checkpoints" / "step_0000150.pt")
    capsys.readouterr()
    assert main(["eval", "--config", "vit-ti-digits", "--checkpoint", ckpt, "--json",
                 "--set", f"data.root={data_root}"] + TINY) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["val_count"] == 360 and abs(res["val_top1"] - summary["val_top1"]) < 1e-9
    with tarfile.open(Path(data_root) / "digits" / "val-000000.tar") as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        (tmp_path / "digit.png").write_bytes(tar.extractfile(png).read())
    assert main(["predict", "--checkpoint", ckpt, str(tmp_path / "digit.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[lines.index(str(tmp_path / "digit.png")) + 1:]]
    probs = [float(p.rstrip("%")) for _, p in rows]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
    assert {name for name, _ in rows} <= set("0123456789")   # the digits' class names, from the checkpoint

    # resuming with other data settings would change the sample order: refused, with the fix
    resume = ["train", "--config", "vit-ti-digits", "--run-dir", str(rd), "--no-progress", "--set",
              f"data.root={data_root}", "--resume", str(rd / "checkpoints" / "step_0000075.pt")] + TINY
    assert main(resume + ["--set", "data.shuffle_buffer=100"]) == 2
    err = capsys.readouterr().err
    assert "shuffle_buffer 512 -> 100" in err and "recipe.yaml" in err and "Traceback" not in err
    assert "load_state_dict" not in err  # the CLI user is told about the CLI, not the API


def _final_weights(rd: Path, step: int):
    ck = torch.load(rd / "checkpoints" / f"step_{step:07d}.pt", map_location="cpu", weights_only=False)
    return ck["model"]


def _final_ema(rd: Path, step: int):
    return torch.load(rd / "checkpoints" / f"step_{step:07d}.pt", map_location="cpu", weights_only=False)["ema"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, data_root, monkeypatch, capsys):
    # every random draw on: dropout, RandAugment + random erasing in the loader workers, Mixup/CutMix
    augment = ["--set", "data.rand_augment=rand-m9-mstd0.5-inc1", "--set", "data.random_erasing=0.25",
               "--set", "data.mixup=0.8", "--set", "data.cutmix=1.0", "--set", "optim.loss=soft_ce"]
    common = ["train", "--config", "vit-ti-digits", "--no-progress", "--set", f"data.root={data_root}",
              "--set", "schedule.total_steps=24", "--set", "schedule.warmup_steps=4",
              "--set", "train.eval_every=0", "--set", "train.checkpoint_every=8",
              "--set", "train.keep_checkpoints=0", "--set", "model.drop_rate=0.1"] + augment + TINY
    common += ["--set", "train.ema_momentum=0.5"]  # the EMA resumes exactly too
    # one epoch of digits train is ~45 steps at batch 32: step 8..16 is mid-epoch. The uninterrupted
    # and the resumed runs run in this process (one thread, as the killed process has); the killed one
    # is a process of its own, killed with SIGKILL.
    monkeypatch.chdir(tmp_path)
    assert main(common + ["--run-dir", str(tmp_path / "full")]) == 0

    rd = tmp_path / "killed"
    victim = _run(common + ["--run-dir", str(rd)], cwd=tmp_path)
    deadline = time.time() + 600
    # its step 16 complete (the marker is written after the checkpoint, by the writer thread)
    while not marker_path(rd / "checkpoints" / "step_0000016.pt").exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (rd / "summary.json").exists()

    capsys.readouterr()
    assert main(common + ["--run-dir", str(rd), "--resume", "auto"]) == 0
    out = "".join(capsys.readouterr())
    assert "resumed from" in out and "step_0000016.pt" in out, out
    a, b = _final_weights(tmp_path / "full", 24), _final_weights(rd, 24)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    ema_a, ema_b = _final_ema(tmp_path / "full", 24), _final_ema(rd, 24)
    assert ema_a["steps"] == ema_b["steps"] == 24
    worst = max((ema_a["params"][k] - ema_b["params"][k]).abs().max().item() for k in ema_a["params"])
    assert worst <= 1e-6, worst


def test_tensorboard_events_mirror_metrics(tmp_path, data_root, monkeypatch):
    pytest.importorskip("tensorboard", reason="TensorBoard events are written only when tensorboard is installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    rd = tmp_path / "run"
    assert main(["train", "--config", "vit-ti-digits", "--run-dir", str(rd), "--no-progress",
                 "--set", f"data.root={data_root}", "--set", "schedule.total_steps=10",
                 "--set", "schedule.warmup_steps=2", "--set", "train.eval_every=0"] + TINY) == 0
    events = EventAccumulator(str(rd / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/images_per_second", "val/val_top1", "val/val_top5"} <= set(scalars)
    logged = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in train] == [5, 10]
    assert abs(events.Scalars("train/loss")[-1].value - train[-1]["loss"]) < 1e-5
