"""The backend seam (backends/base.py), the precision strategies of the CPU/GPU step loop
(backends/precision.py) and the process-group queries (engine/distributed.py), in one process."""
from __future__ import annotations

import pytest
import torch

from vit_accel.backends.base import Backend
from vit_accel.backends.cpu import CPUBackend
from vit_accel.backends.gpu import GPUBackend
from vit_accel.backends.ipu import IPUBackend
from vit_accel.backends.precision import Autocast, LossScaledFP16, precision_for
from vit_accel.engine import distributed

# What the trainer, `vit-accel eval` and `vit-accel bench` call, and nothing else.
SEAM = {"name", "recipe", "model", "unavailable_reason", "model_options", "setup", "batch_per_call",
        "steps_per_call", "eval_batch_size", "wrap_train_loader", "train_step", "eval_step", "save_state",
        "load_state", "close"}
MUST_IMPLEMENT = {"setup", "batch_per_call", "eval_batch_size", "train_step", "eval_step", "save_state", "load_state"}


def test_backend_public_members_are_the_seam():
    declared = {n for n in vars(Backend) if not n.startswith("_")}
    b = object.__new__(Backend)
    Backend.__init__(b, recipe=None)
    assert declared | set(vars(b)) == SEAM


def test_every_backend_implements_what_the_seam_leaves_open():
    for cls in (CPUBackend, GPUBackend, IPUBackend):
        missing = [n for n in MUST_IMPLEMENT if getattr(cls, n) is getattr(Backend, n)]
        assert not missing, (cls.__name__, missing)


def test_one_process_is_rank_0_of_1_and_collectives_are_identities():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert distributed.all_reduce_sum(t) is t
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("runs/x") == "runs/x"
    distributed.barrier()


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_fp32_and_bf16_autocast_step_and_clip():
    assert type(precision_for("fp32", "cpu", loss_scaling=True)) is Autocast
    assert type(precision_for("bf16", "cpu", loss_scaling=True)) is Autocast
    assert type(precision_for("fp16", "cuda", loss_scaling=False)) is Autocast   # DeepSpeed scales
    model, opt = _tiny()
    x = torch.randn(8, 4)
    with precision_for("bf16", "cpu", loss_scaling=True).autocast():
        assert model(x).dtype == torch.bfloat16
    p = Autocast("fp32", "cpu")
    with p.autocast():
        loss = model(x).pow(2).sum() * 100
    p.backward(loss)
    expected = torch.nn.utils.get_total_norm([q.grad for q in model.parameters()]).item()
    before = model.weight.detach().clone()
    norm, skipped = p.step(opt, model.parameters(), clip_grad_norm=1.0)
    assert abs(norm - expected) < 1e-4 * expected and not skipped
    assert not torch.equal(model.weight, before) and model.weight.grad is None
    assert p.state_dict() == {}


def test_fp16_loss_scaler_skips_an_overflowing_step_and_checkpoints_its_scale():
    model, opt = _tiny()
    p = precision_for("fp16", "cpu", loss_scaling=True)
    assert isinstance(p, LossScaledFP16)
    p.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = model.weight.detach().clone()
    p.backward(model(torch.full((2, 4), float("inf"))).sum())
    norm, skipped = p.step(opt, model.parameters(), clip_grad_norm=0.0)
    assert skipped and norm is None and torch.equal(model.weight, before)
    assert p.scaler.get_scale() == 2.0 ** 15
    p.backward(model(torch.randn(2, 4)).sum())
    _, skipped = p.step(opt, model.parameters(), clip_grad_norm=0.0)
    assert not skipped and not torch.equal(model.weight, before)
    saved = p.state_dict()
    assert saved["grad_scaler"]["scale"] == 2.0 ** 15
    q = LossScaledFP16("cpu")
    q.load_state_dict(saved)
    assert q.scaler.get_scale() == 2.0 ** 15


def test_train_and_eval_release_the_backend_on_success_and_on_error(tmp_path, monkeypatch):
    """close() leaves the process group: left to the exit handlers, a torchrun gloo group ended
    successful runs with SIGABRT ("terminate called without an active exception")."""
    from vit_accel.cli import main
    from vit_accel.config import load_recipe
    from vit_accel.engine.rundir import list_checkpoints
    from vit_accel.engine.trainer import train

    left = []
    monkeypatch.setattr(distributed, "leave_process_group", lambda: left.append(1))
    monkeypatch.chdir(tmp_path)
    tiny = ["model.depth=1", "train.global_batch_size=16", "cpu.micro_batch_size=16", "schedule.total_steps=1",
            "schedule.warmup_steps=0", "train.eval_every=0", "data.workers=0", f"data.root={tmp_path / 'data'}"]
    train(load_recipe("vit-ti-digits", tiny, backends=["cpu"]), "cpu", run_dir=str(tmp_path / "ok"), progress=False)
    assert left == [1]
    args = ["eval", "--backend", "cpu", "--config", "vit-ti-digits", "--checkpoint", str(list_checkpoints(tmp_path / "ok")[-1])]
    assert main(args + [x for kv in tiny for x in ("--set", kv)]) == 0
    assert left == [1, 1]

    def broken_step(self, images, labels, lr):
        raise RuntimeError("device lost")

    monkeypatch.setattr(CPUBackend, "train_step", broken_step)
    try:
        train(load_recipe("vit-ti-digits", tiny, backends=["cpu"]), "cpu", run_dir=str(tmp_path / "bad"), progress=False)
    except RuntimeError as e:
        assert "device lost" in str(e)
    else:
        pytest.fail("the failing step did not fail the run")
    assert left == [1, 1, 1]
