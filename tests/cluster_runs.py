"""Helpers for tests/test_cluster.py: short digits runs as clusters run them (torchrun, SLURM),
and what the tests read back (weights, metrics, processes)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from testkit import free_port

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 12, 4


def train_args(data_root, *extra: str) -> List[str]:
    """`vit-accel train` of a tiny digits run: 12 steps of 32 images, a checkpoint every 4."""
    sets = [f"data.root={data_root}", "model.depth=1", "train.global_batch_size=32", f"schedule.total_steps={STEPS}",
            "schedule.warmup_steps=2", "train.eval_every=0", f"train.checkpoint_every={EVERY}",
            "train.keep_checkpoints=0", "data.workers=0", "train.log_every=1", "train.eval_batch_size=360",
            # fp32: runs on 1, 2 and 3 processes and under ZeRO agree to 1e-5 (bf16 autocast, auto's
            # choice on a native-bf16 CPU, rounds each process's half-batch differently; ZeRO is fp32)
            "cpu.precision=fp32"]
    out = ["train", "--config", "vit-ti-digits", "--no-progress"]
    for s in sets + list(extra):
        out += ["--set", s]
    return out


def env(**extra: str) -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                      "DS_ACCELERATOR", "SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", PYTHON=sys.executable,
             PATH=str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", ""),
             PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
             TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions")))
    e.update(extra)
    return e


def torchrun(args: List[str], cwd: Path, log: Path, nproc: int = 2, **extra: str) -> subprocess.Popen:
    """launch/torchrun.sh with ``nproc`` CPU processes; output to ``log``."""
    return subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), *args], cwd=cwd,
                            env=env(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()), **extra),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600, codes=(0,)) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out after {timeout} s:\n{log.read_text()[-4000:]}")
    out = log.read_text()
    assert proc.returncode in codes, f"exit {proc.returncode}:\n{out[-6000:]}"
    return out


def records(rd: Path, kind: str) -> List[dict]:
    path = Path(rd) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, filter(None, lines)) if r.get("kind") == kind]


def wait_for_step(rd: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Until the run has logged ``step`` (its log_every is 1)."""
    deadline = time.time() + timeout
    while not any(r["step"] >= step for r in records(rd, "train")):
        assert proc.poll() is None, f"ended early ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"no step {step} after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def weights(rd: Path, step: int = STEPS) -> Dict[str, torch.Tensor]:
    return torch.load(Path(rd) / "checkpoints" / f"step_{step:07d}.pt", map_location="cpu", weights_only=True)["model"]


def worst(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def copy_until(src: Path, dst: Path, step: int) -> Path:
    """A run directory as ``src`` was right after its checkpoint at ``step`` (later files left out)."""
    (dst / "checkpoints").mkdir(parents=True)
    for p in (src / "checkpoints").glob(f"step_{step:07d}.*"):
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / "checkpoints" / p.name)
    shutil.copy2(src / "recipe.yaml", dst / "recipe.yaml")
    kept = [line for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return dst


def children(parent: int) -> List[int]:
    """The pids of ``parent``'s child processes (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def worker_pid(agent: int, local_rank: int) -> Optional[int]:
    """The pid of torchrun agent ``agent``'s worker with LOCAL_RANK ``local_rank``."""
    for pid in children(agent):
        try:
            if f"LOCAL_RANK={local_rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


# ---------------------------------------------------------------------------------------
# A one-node SLURM cluster on this machine (Debian's slurm-wlm and munge)
# ---------------------------------------------------------------------------------------

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")


class SlurmCluster:
    """munged, slurmctld and slurmd of a one-node cluster (this host, 2 CPUs) in ``folder``.

    ``start()`` returns None, or the exact reason the cluster cannot run here.
    """

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.conf = self.dir / "slurm.conf"
        self.env = env(SLURM_CONF=str(self.conf))

    def start(self) -> Optional[str]:
        missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
        if missing:
            return (f"Slurm is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge "
                    f"(.ci/run does)")
        if os.geteuid() != 0:
            return "the one-node Slurm cluster runs its daemons as root; this test runs as uid %d" % os.geteuid()
        d, host = self.dir, socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "munge.key").write_bytes(os.urandom(1024))
        os.chmod(d / "munge.key", 0o400)
        ctld_port, slurmd_port = free_port(), free_port()
        self.conf.write_text("\n".join([
            "ClusterName=vitaccel", f"SlurmctldHost={host}", f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={d}/munge.sock", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            # the scheduling passes (one starts a requeued job once its start time has come and the node is
            # free again) every second, not every 60 and 30
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool", f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid", f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
            f"NodeName={host} CPUs=2 State=UNKNOWN", f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE "
            "State=UP", ""]))
        steps = [["munged", "--force", f"--key-file={d}/munge.key", f"--socket={d}/munge.sock",
                  f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed"],
                 ["slurmctld", "-f", str(self.conf)], ["slurmd", "-f", str(self.conf)]]
        for cmd in steps:
            p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                self.stop()
                return f"{cmd[0]} does not start here (exit {p.returncode}): {(p.stderr or p.stdout).strip()[:300]}"
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T").stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return None
            time.sleep(0.5)
        self.stop()
        return f"slurmd did not register with slurmctld within 60 s (node state {out!r})"

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as key -> value (empty once the job is gone)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stop(self) -> None:
        if self.conf.exists():
            self.run("scontrol", "shutdown")
        deadline = time.time() + 30
        for name in ("slurmctld.pid", "slurmd.pid", "munged.pid"):
            pid_file = self.dir / name
            if not pid_file.exists():
                continue
            try:
                pid = int(pid_file.read_text().strip())
            except ValueError:
                continue
            if name == "munged.pid":
                _signal(pid, 15)
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                _signal(pid, 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass
