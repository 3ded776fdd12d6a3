"""Nothing lost at cluster scale: a stop signal, a save cut off, a killed rank, a job resized or
requeued by SLURM; each run ends with the weights of the uninterrupted run.

Real processes throughout: signals sent to the process, launch/torchrun.sh (torchrun restarting
its group), DeepSpeed ZeRO-3 on gloo, a one-node SLURM cluster (slurmctld + slurmd + munged).
Two uninterrupted runs are the references: `solo` (one process, in this process) and `pair` (two
processes under torchrun). Same sample order on any number of processes means the runs agree:
bit for bit on the same world size, within float summation order (1e-5) across world sizes.
"""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import threading
import time
from pathlib import Path

import pytest

from cluster_runs import (EVERY, ROOT, STEPS, SlurmCluster, children, copy_until, finish, free_port, records,
                          torchrun, train_args, wait_for_step, weights, worker_pid, worst)
from testkit import made_once
from vit_accel.cli import main
from vit_accel.engine.rundir import list_checkpoints
from vit_accel.engine.saving import read_marker
from vit_accel.engine.stop import EXIT_STOPPED

ACROSS_WORLD_SIZES = 1e-5


# The data and the two references are made once per session (the xdist workers share them; the
# tests only read them).
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return Path(made_once(tmp_path_factory, "cluster_data", str))


@pytest.fixture(scope="module")
def solo(data_root, tmp_path_factory):
    """The uninterrupted run on one process."""
    def run(folder):
        assert main(train_args(data_root) + ["--run-dir", str(folder / "run")]) == 0
        return str(folder / "run")

    return Path(made_once(tmp_path_factory, "cluster_solo", run))


@pytest.fixture(scope="module")
def pair(data_root, tmp_path_factory):
    """The uninterrupted run on two processes (launch/torchrun.sh)."""
    def run(base):
        finish(torchrun(train_args(data_root) + ["--run-dir", str(base / "run")], base, base / "log"), base / "log")
        return str(base / "run")

    return Path(made_once(tmp_path_factory, "cluster_pair", run))


def _losses(rd: Path):
    return {r["step"]: r["loss"] for r in records(rd, "train")}


# ---------------------------------------------------------------------------------------
# One process: a stop signal, a save cut off half-way, bad input
# ---------------------------------------------------------------------------------------

def test_a_stop_signal_checkpoints_the_step_in_flight_and_the_resume_is_exact(solo, data_root, tmp_path, capsys):
    rd, at = tmp_path / "run", random.Random().choice([5, 6, 7, 9, 10])
    done = threading.Event()

    def signal_at_step():
        deadline = time.time() + 600
        while not any(r["step"] >= at for r in records(rd, "train")) and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        for pid in children(os.getpid()):   # as a scheduler does: the loader's workers get it too
            os.kill(pid, signal.SIGTERM)
        while not done.is_set():            # again and again while the run stops: ignored, nothing torn
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)

    # signals landing after the run meet this handler, not pytest's default (which would end the session)
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        sender = threading.Thread(target=signal_at_step, daemon=True)
        sender.start()
        # two loader workers here, none in `solo`: the same samples and crops
        assert main(train_args(data_root, "data.workers=2") + ["--run-dir", str(rd)]) == EXIT_STOPPED, at
    finally:
        done.set()
        sender.join()
        signal.signal(signal.SIGTERM, previous)
    stopped = max(_losses(rd))                      # the last step it finished
    assert stopped >= at
    assert list_checkpoints(rd)[-1].name == f"step_{stopped:07d}.pt" and read_marker(list_checkpoints(rd)[-1])
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM after step {stopped}" in err and "received again: ignored" in err
    assert "--resume auto" in err and f"exit code {EXIT_STOPPED}" in err

    assert main(train_args(data_root) + ["--run-dir", str(rd), "--resume", "auto"]) == 0
    assert worst(weights(rd), weights(solo)) == 0.0
    assert records(rd, "resume")[-1]["step"] == stopped and records(rd, "resume")[-1]["redone_steps"] == 0


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_save_cut_off_half_way_leaves_the_previous_checkpoint_the_newest(solo, data_root, tmp_path, capsys,
                                                                            asynchronous):
    """The file size limit stops the write of step 8's checkpoint mid-file, as a full disk would."""
    rd = copy_until(solo, tmp_path / "run", 4)
    size = (rd / "checkpoints" / "step_0000004.pt").stat().st_size
    args = train_args(data_root, f"train.async_checkpoint={str(asynchronous).lower()}")
    args += ["--run-dir", str(rd), "--resume", "auto"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
    try:
        code = main(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2 and "could not be written" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(rd)] == ["step_0000004.pt"]
    assert [p.stat().st_size for p in (rd / "checkpoints").glob(".step_0000008.pt.tmp*")] == [size // 2]
    reached = max(_losses(rd))                      # 8, or 12 when the writes ran in the background

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_0000004.pt at step 4" in out
    assert f"{reached - 4} step(s) redone (the interrupted attempt had reached step {reached})" in out
    assert not list((rd / "checkpoints").glob(".*tmp*"))
    assert worst(weights(rd), weights(solo)) == 0.0


def test_resume_refuses_a_changed_shape_or_global_batch_naming_the_keys(solo, data_root, tmp_path, capsys):
    ckpt = solo / "checkpoints" / "step_0000004.pt"
    code = main(train_args(data_root, "model.depth=2", "train.global_batch_size=64")
                + ["--run-dir", str(tmp_path / "run"), "--resume", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and "model.depth 1 -> 2" in err and "train.global_batch_size 32 -> 64" in err
    assert "recipe.yaml" in err and "model.pretrained=" in err


def test_a_requeued_job_whose_run_directory_is_gone_says_so(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert main(train_args(data_root) + ["--run-dir", str(tmp_path / "gone"), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "restart 1 of the job (SLURM_RESTART_COUNT=1)" in err and "gone" in err and "does not exist" in err
    assert not (tmp_path / "gone").exists()


def test_resume_auto_without_a_checkpoint_keeps_the_old_metrics_apart_and_says_so(data_root, tmp_path, capsys):
    rd = tmp_path / "run"
    rd.mkdir()
    old = '{"kind": "train", "step": 3, "loss": 9.5}\n'
    (rd / "metrics.jsonl").write_text(old)          # an attempt that died before its first checkpoint
    assert main(train_args(data_root, "schedule.total_steps=2", "schedule.warmup_steps=1") + ["--run-dir", str(rd), "--resume", "auto"]) == 0
    assert "the earlier attempt's metrics moved to metrics.jsonl.1" in capsys.readouterr().out
    assert (rd / "metrics.jsonl.1").read_text() == old
    assert [r["step"] for r in records(rd, "train")] == [1, 2]


# ---------------------------------------------------------------------------------------
# Several processes: a killed rank, another world size, ZeRO-3, SLURM
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_restarts_a_group_whose_rank_was_killed_and_nothing_is_lost(pair, data_root, tmp_path):
    rd, log = tmp_path / "run", tmp_path / "log"
    proc = torchrun(train_args(data_root) + ["--run-dir", str(rd), "--resume", "auto"], tmp_path, log)
    wait_for_step(rd, 6, proc, log)
    victim = worker_pid(proc.pid, 1)        # launch/torchrun.sh execs torchrun: its pid is the agent's
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out = finish(proc, log)
    assert worst(weights(rd), weights(pair)) == 0.0
    (resume,) = records(rd, "resume")
    assert resume["step"] % EVERY == 0 and resume["redone_steps"] <= EVERY, resume   # at most one interval lost
    assert resume["redone_steps"] == 0 or f"{resume['redone_steps']} step(s) redone" in out


@pytest.mark.slow
def test_a_run_resumes_on_fewer_or_more_processes(solo, pair, data_root, tmp_path):
    assert worst(weights(pair), weights(solo)) < ACROSS_WORLD_SIZES   # one sample order for 1 and 2 processes
    down = copy_until(pair, tmp_path / "down", 4)
    assert main(train_args(data_root) + ["--run-dir", str(down), "--resume", "auto"]) == 0
    up = copy_until(solo, tmp_path / "up", 4)
    finish(torchrun(train_args(data_root) + ["--run-dir", str(up), "--resume", "auto"], tmp_path, tmp_path / "log"),
           tmp_path / "log")
    for rd, (was, now) in ((down, (2, 1)), (up, (1, 2))):
        resume = records(rd, "resume")[-1]
        assert (resume["step"], resume["checkpoint_world_size"], resume["world_size"]) == (4, was, now)
        # the same samples in every step: the global-batch loss and the weights as on one process
        assert max(abs(_losses(rd)[s] - _losses(solo)[s]) for s in range(5, STEPS + 1)) < 1e-4
        assert worst(weights(rd), weights(solo)) < ACROSS_WORLD_SIZES


@pytest.mark.slow
def test_zero3_stop_signal_then_resume_on_two_processes(pair, data_root, tmp_path, capsys):
    """ZeRO-3's own shards resume the same world size (another world size: tests/test_zero.py), and
    the consolidated checkpoint evaluates on one process."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    zero = train_args(data_root, "distributed.zero_stage=3")
    rd, log = tmp_path / "z3", tmp_path / "log"
    proc = torchrun(zero + ["--run-dir", str(rd), "--resume", "auto"], tmp_path, log)
    wait_for_step(rd, 5, proc, log)
    os.kill(proc.pid, signal.SIGUSR1)       # to torchrun, which passes it to both processes
    out = finish(proc, log, codes=(1,))     # torchrun ends with an error after a signal
    stopped = max(_losses(rd))
    assert f"stopped by SIGUSR1 after step {stopped}" in out
    ckpt = list_checkpoints(rd)[-1]
    assert ckpt.name == f"step_{stopped:07d}.pt" and ckpt.with_suffix(".ds").is_dir()
    assert read_marker(ckpt)["world_size"] == 2 and read_marker(ckpt)["zero_stage"] == 3
    finish(torchrun(zero + ["--run-dir", str(rd), "--resume", "auto"], tmp_path, log), log)
    assert records(rd, "resume")[-1]["step"] == stopped
    assert worst(weights(rd), weights(pair)) < ACROSS_WORLD_SIZES     # ZeRO-3 against plain data parallel

    # its checkpoint evaluates on one process: the validation images once split over the 2 ranks
    capsys.readouterr()
    train = train_args(data_root)
    assert main(["eval", "--backend", "cpu", "--checkpoint", str(rd / "checkpoints" / f"step_{STEPS:07d}.pt"), "--json"]
                + [a for a in train[1:] if a != "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    val = records(rd, "val")[-1]
    assert res["val_count"] == val["val_count"] == 360
    assert abs(res["val_loss"] - val["val_loss"]) < 1e-4 and abs(res["val_top1"] - val["val_top1"]) < 1e-9


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    why = cluster.start()
    if why:
        pytest.skip(why)
    yield cluster
    cluster.stop()


def _until(what, check, timeout: float = 600, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.mark.slow
def test_slurm_signal_requeues_the_job_which_ends_with_the_uninterrupted_weights(slurm, pair, data_root, tmp_path):
    rd, log = tmp_path / "run", tmp_path / "job.out"
    slurm.env.update(NPROC_PER_TASK="1", MASTER_PORT=str(free_port()))
    sub = slurm.run("sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
                    "--gpus-per-node=0", "--time=30", f"--output={log}", f"--chdir={tmp_path}",
                    str(ROOT / "launch" / "slurm.sbatch"), *train_args(data_root), "--run-dir", str(rd))
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    _until("step 5", lambda: any(r["step"] >= 5 for r in records(rd, "train")) or slurm.job(job).get("JobState")
           not in ("RUNNING", "PENDING"))
    assert slurm.job(job)["JobState"] == "RUNNING", log.read_text()[-3000:]
    assert slurm.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    _until("requeued", lambda: slurm.job(job).get("Restarts") == "1" and slurm.job(job).get("JobState") == "PENDING")
    # A requeued job waits about two minutes; start it sooner, but not in the second its first run was
    # killed: slurmd refuses credentials issued then ("Job credential revoked") and the job FAILS.
    slurm.run("scontrol", "update", f"jobid={job}", "starttime=now+2")
    state = _until("the requeued job's end", lambda: slurm.job(job).get("JobState") in ("COMPLETED", "FAILED",
                                                                                       "CANCELLED", "TIMEOUT")
                   and slurm.job(job))
    out = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", out[-4000:]
    assert "requeueing job" in out and "vit-accel: stopped by SIGUSR1 after step" in out
    assert "restart 1" in out and "resumed from" in out
    assert worst(weights(rd), weights(pair)) == 0.0
    assert records(rd, "resume")[-1]["redone_steps"] == 0


def test_each_torchrun_attempt_meets_only_its_own_processes(monkeypatch):
    """torchrun keeps one store across the restarts of a group; a restarted group must not read the
    addresses its dead predecessor wrote there (it would wait in gloo's connect for 30 minutes)."""
    from datetime import timedelta

    import torch.distributed as dist

    from vit_accel.engine import distributed

    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30))   # the agent's
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert distributed._attempt_store() is None                      # not under torchrun: env:// as usual
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = distributed._attempt_store()
    first.set("rank_0", "127.0.0.1:40001")                           # the first attempt's rank 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = distributed._attempt_store()
    assert second.check(["rank_0"]) is False                         # the restarted group does not see it
    second.set("rank_0", "127.0.0.1:40002")
    assert first.get("rank_0") == b"127.0.0.1:40001" and second.get("rank_0") == b"127.0.0.1:40002"
    assert agent.num_keys() >= 2
