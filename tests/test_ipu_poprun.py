"""Several instances under poprun, with the PopTorch and popdist doubles in 2 processes.

Each process is one instance (tests/ipu_instance.py) with the variables poprun gives it:
1 of the digits recipe's 2 replicas each, gradients combined across instances by the double
(the distributed replicated graph), the host reductions over gloo. Checked: validation
metrics are reduced over the instances (they equal one evaluation of the whole validation
set), each checkpoint is written once, and a run resumed on every instance from its step-1
checkpoint ends with the weights of the uninterrupted run.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import popdist_double
import poptorch_double
from vit_accel.backends.ipu import IPUBackend
from vit_accel.config import ConfigError, load_recipe
from vit_accel.data.digits import ensure_digits
from vit_accel.data import EvalLoader
from vit_accel.data import resolve_shards
from vit_accel.engine.rundir import list_checkpoints
from vit_accel.model import ViTConfig, ViT
from testkit import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTANCE = os.path.join(REPO, "tests", "ipu_instance.py")
ARGS = ["train", "--backend", "ipu", "--config", "vit-ti-digits", "--no-progress",
        "--set", "schedule.total_steps=2", "--set", "schedule.warmup_steps=1", "--set", "train.eval_every=0",
        "--set", "train.checkpoint_every=1", "--set", "data.workers=0", "--set", "train.log_every=1",
        "--set", "ipu.loader_mode=async_rebatched", "--set", "ipu.buffer_size=2"]    # through the read-ahead feed


def poprun(cwd, extra, instances=2):
    """Start ``instances`` processes as poprun would, wait, return their outputs.

    Each writes to a file: with pipes, an instance blocked on a full pipe (torch 2.0.1 prints
    more warnings) while we wait on the other would leave that one waiting in a collective.
    """
    port = free_port()
    procs, logs = [], []
    for i in range(instances):
        env = dict(os.environ, OMPI_COMM_WORLD_RANK=str(i), OMPI_COMM_WORLD_SIZE=str(instances),
                   POPDIST_NUM_TOTAL_REPLICAS="2", POPDIST_NUM_IPUS_PER_REPLICA="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        logs.append(os.path.join(str(cwd), "instance%d-%d.log" % (i, port)))
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, INSTANCE] + ARGS + list(extra), cwd=cwd, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
    outs = []
    for p, path in zip(procs, logs):
        with open(path) as f:
            outs.append(f.read())
        assert p.returncode == 0, outs[-1][-3000:]
    return outs


def top1_of_checkpoint(path, val_spec) -> float:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)   # written by this test
    cfg = dict(ckpt["vit_config"], attn_impl="eager")
    model = ViT(ViTConfig.from_dict(cfg)).eval()
    model.load_state_dict(ckpt["model"])
    hits = n = 0
    with torch.no_grad():
        for images, labels in EvalLoader(resolve_shards(val_spec), cfg["img_size"], 128, resize=32):
            x = (images.float() - 127.5) / 127.5
            hits += (model(x).argmax(1) == labels).sum().item()
            n += labels.numel()
    return hits / n, n


@pytest.mark.slow
def test_two_instances_reduce_metrics_write_once_and_resume(tmp_path):
    _, val_spec, _ = ensure_digits(str(tmp_path / "data"))      # written once, before the instances start
    outs = poprun(tmp_path, ["--run-dir", "whole"])
    assert "2 process(es)" in outs[0] and outs[1].strip() == ""   # instance 1 prints nothing

    whole = tmp_path / "whole"
    ckpts = list_checkpoints(whole)
    assert sorted(os.listdir(whole / "checkpoints")) == ["step_0000001.done", "step_0000001.pt", "step_0000002.done",
                                                         "step_0000002.pt"]  # once, each with its marker, no strays
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    vals = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "val"]
    top1, n = top1_of_checkpoint(ckpts[-1], val_spec)
    assert vals[-1]["val_count"] == n                            # both halves of the validation set
    assert summary["val_top1"] == pytest.approx(top1, abs=1.5 / n)

    parts = tmp_path / "parts" / "checkpoints"                   # as if stopped after step 1
    parts.mkdir(parents=True)
    shutil.copy(ckpts[0], parts / ckpts[0].name)   # without its marker: a folder of an older vit-accel
    outs = poprun(tmp_path, ["--run-dir", "parts", "--resume"])
    assert "resumed from" in outs[0] and "at step 1" in outs[0]
    a = torch.load(ckpts[-1], map_location="cpu", weights_only=False)   # written by this test
    b = torch.load(list_checkpoints(parts.parent)[-1], map_location="cpu", weights_only=False)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    assert b["data"] == a["data"] and len(a["data"]["per_rank"]) == 2


def test_instances_need_a_rendezvous_and_the_recipes_replicas(monkeypatch):
    for name, mod in (("poptorch", poptorch_double), ("popdist", popdist_double),
                      ("popdist.poptorch", popdist_double.poptorch)):
        monkeypatch.setitem(sys.modules, name, mod)
    for k, v in dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2", POPDIST_NUM_TOTAL_REPLICAS="2",
                     POPDIST_NUM_IPUS_PER_REPLICA="2").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="2 instances: MASTER_ADDR and MASTER_PORT not set.*launch/poprun.sh"):
        IPUBackend(load_recipe("vit-ti-digits"))
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "4")
    with pytest.raises(ConfigError, match="poprun --num-replicas 4 but ipu.replicas is 2"):
        IPUBackend(load_recipe("vit-ti-digits"))
