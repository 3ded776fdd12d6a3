"""The IPU backend against the PopTorch test double (tests/poptorch_double.py), plus the
checks that need real PopTorch (skipped unless `import poptorch` is the real one).

The double goes into sys.modules["poptorch"], so the code under test is the production
code of vit_accel/backends/ipu.py, unchanged.
"""
import importlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import poptorch_double
from vit_accel.backends.ipu import (IPUBackend, apply_plan, build_inference_options, build_optimizer,
                                    build_options)
from vit_accel.backends.pipeline import build_plan
from vit_accel.config import ConfigError, load_recipe
from vit_accel.model import create_vit

try:
    _real = importlib.import_module("poptorch")
    REAL_POPTORCH = not getattr(_real, "TEST_DOUBLE", False)
except Exception:
    REAL_POPTORCH = False
requires_poptorch = pytest.mark.skipif(not REAL_POPTORCH, reason="needs real PopTorch (Poplar SDK) and an IPU")


def _cpu_runs_half() -> bool:
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 2, 2, dtype=torch.half), torch.ones(1, 1, 1, 1, dtype=torch.half))
        return True
    except RuntimeError:      # torch 2.0.1: "slow_conv2d_cpu" not implemented for 'Half'
        return False


# The double executes on the CPU; torch 2.0.1's CPU kernels have no fp16 convolution or matmul
# (an IPU has both), so fp16 steps through the double run only with newer torch.
requires_cpu_half = pytest.mark.skipif(not _cpu_runs_half(), reason="this torch has no fp16 conv/matmul on the CPU")

# A small fp32 IPU recipe with SGD: 1 replica x 4 accumulation x 4 micro-batch = 16 images per call.
SMALL = ["model.name=vit-ti16", "model.img_size=16", "model.patch_size=8", "model.depth=4", "model.num_classes=5",
         "train.global_batch_size=16", "cpu.micro_batch_size=16", "gpu.micro_batch_size=16",
         "ipu.micro_batch_size=4", "ipu.gradient_accumulation=4", "ipu.replicas=1", "ipu.ipus_per_replica=2",
         "ipu.splits=[patch_embed, blocks.2]", "ipu.half=false", "ipu.partials_type=float",
         "ipu.accum_type=float", "ipu.velocity_accum_type=float", "ipu.loss_scaling=1.0", "ipu.loader_mode=sync",
         "train.eval_batch_size=8", "optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=0.01",
         "optim.label_smoothing=0.0", "optim.clip_grad_norm=0.0", "optim.no_decay_1d=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def double(monkeypatch):
    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    monkeypatch.setattr(poptorch_double, "HARDWARE_IPUS", 64)
    monkeypatch.delenv("POPTORCH_IPU_MODEL", raising=False)
    poptorch_double.events.clear()
    return poptorch_double


def small_backend(extra=()):
    r = load_recipe("vit-ti-digits", SMALL + list(extra))
    b = IPUBackend(r)
    torch.manual_seed(0)
    m = create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5, **b.model_options())
    torch.nn.init.normal_(m.head.weight, std=0.1)
    return r, b, m


def batch(n, classes=5, size=16):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.randint(0, classes, (n,))


# ---------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------

def test_without_poptorch_the_reason_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "poptorch", None)      # `import poptorch` raises ImportError
    reason = IPUBackend.unavailable_reason()
    assert "PopTorch is not installed" in reason and "poptorch-*.whl" in reason
    assert "3.3 -> torch 2.0.1" in reason and "3.0 -> torch 1.10.0" in reason and "\n" not in reason


def test_without_poptorch_the_cli_exits_2(monkeypatch, capsys):
    from vit_accel.cli import main

    monkeypatch.setitem(sys.modules, "poptorch", None)
    assert main(["train", "--backend", "ipu", "--config", "vit-ti-digits"]) == 2
    assert "PopTorch is not installed" in capsys.readouterr().err


def test_poptorch_without_an_ipu(double, monkeypatch):
    monkeypatch.setattr(double, "HARDWARE_IPUS", 0)
    assert "no IPU is attached" in IPUBackend.unavailable_reason()
    monkeypatch.setenv("POPTORCH_IPU_MODEL", "1")            # the simulator needs no hardware
    assert IPUBackend.unavailable_reason() is None


# ---------------------------------------------------------------------------------------
# the vit-b16-ft recipe: options, blocks, optimizer
# ---------------------------------------------------------------------------------------

def test_vit_b16_ft_options(double):
    opts = build_options(load_recipe("vit-b16-ft"), double)
    assert opts.replication_factor == 4 and opts.device_iterations == 1
    assert opts.Training.gradient_accumulation == 32
    assert opts.Training.accumulation_and_replication_reduction_type == double.ReductionType.Mean
    assert opts.output_mode == double.OutputMode.Final
    assert isinstance(opts.execution_strategy, double.PipelinedExecution)
    assert opts.execution_strategy.args == (double.AutoStage.SameAsIpu,)
    assert opts.available_memory_proportion == {"IPU0": 0.3, "IPU1": 0.3, "IPU2": 0.3, "IPU3": 0.3}
    assert opts.Precision.partials_type == torch.half and opts.Precision.stochastic_rounding is True
    assert opts.random_seed == 42 and opts.executable_cache is None
    assert opts.TensorLocations.optimizer.values == {"onChip": True, "useReplicatedTensorSharding": False}
    assert opts._Popart.options == {"disableGradAccumulationTensorStreams": True}   # no popart here
    cached = build_options(load_recipe("vit-b16-ft", ["ipu.executable_cache=/tmp/cache", "ipu.output_mode=all"]),
                           double)
    assert cached.executable_cache == "/tmp/cache" and cached.output_mode == double.OutputMode.All


def test_inference_options_are_cloned_and_training_options_freeze(double):
    r = load_recipe("vit-b16-ft")
    train = build_options(r, double)
    double.trainingModel(torch.nn.Linear(2, 2), train)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        train.deviceIterations(2)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        train.Training.gradientAccumulation(1)
    inf = build_inference_options(train, double)
    assert (inf.replication_factor, inf.Training.gradient_accumulation, inf.device_iterations) == (1, 1, 1)
    assert isinstance(inf.execution_strategy, double.ShardedExecution)
    assert inf.Precision.partials_type == torch.half            # the rest is inherited
    assert train.replication_factor == 4 and train.Training.gradient_accumulation == 32
    assert build_inference_options(r, double).replication_factor == 1
    with pytest.raises(double.Error, match="gradientAccumulation to 1"):
        double.inferenceModel(torch.nn.Linear(2, 2), build_options(r, double))


def test_vit_b16_ft_blocks_and_recompute_checkpoints(double):
    r = load_recipe("vit-b16-ft")
    with torch.device("meta"):                                  # 86 M parameters, no memory
        model = create_vit("vit-b16", attn_impl="eager", drop_rate=0.1)
    apply_plan(model, build_plan(r), double)
    model(torch.empty(2, 3, 224, 224, device="meta"))
    blocks = [e[1:] for e in double.events if e[0] == "block"]
    assert blocks == [("stage0:patch_embed", 0), ("stage1:blocks.3", 1), ("stage2:blocks.6", 2),
                      ("stage3:blocks.9", 3)]
    assert sum(e[0] == "checkpoint" for e in double.events) == 12
    with pytest.raises(double.Error, match="module has already been assigned to a block."):
        apply_plan(model, build_plan(r), double)


def test_vit_b16_ft_optimizer(double):
    r = load_recipe("vit-b16-ft")
    with torch.device("meta"):
        model = create_vit("vit-b16", attn_impl="eager")
    opt = build_optimizer(model, r, double)
    assert isinstance(opt, double.optim.SGD)
    assert (opt.loss_scaling, opt.velocity_accum_type, opt.accum_type, opt.use_combined_accum) == (
        256.0, torch.float16, torch.float16, False)
    assert opt.max_grad_norm == float("inf")                   # no clipping in the recipe
    decay, no_decay = opt.param_groups
    assert {id(p) for p in no_decay["params"]} == {id(model.cls_token), id(model.pos_embed)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-5
    assert decay["lr"] == 0.08 and decay["momentum"] == 0.9


# ---------------------------------------------------------------------------------------
# steps through the double
# ---------------------------------------------------------------------------------------

def test_train_step_equals_one_plain_step(double):
    r, b, m = small_backend()
    ref = create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5, attn_impl="eager")
    ref.load_state_dict(m.state_dict())
    b.setup(m)
    assert b.batch_per_call == 16 and b.steps_per_call == 1
    x, y = batch(16)
    res = b.train_step(x, y, lr=0.05)

    opt = torch.optim.SGD([{"params": [p for k, p in ref.named_parameters() if k not in ("cls_token", "pos_embed")],
                            "weight_decay": 0.01},
                           {"params": [ref.cls_token, ref.pos_embed], "weight_decay": 0.0}], lr=0.05, momentum=0.9)
    xn = (x.float() - 127.5) / 127.5
    with torch.no_grad():       # Final output mode, 1 replica: the loss of the last micro-batch, before the update
        last = F.cross_entropy(ref(xn[12:]), y[12:]).item()
    assert res.loss == pytest.approx(last, abs=1e-5)
    F.cross_entropy(ref(xn), y).backward()
    opt.step()
    sd = b.model_state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=2e-6, msg=k)


def test_lr_is_pushed_with_set_optimizer_when_it_changes(double):
    r, b, m = small_backend()
    b.setup(m)
    x, y = batch(16)
    b.train_step(x, y, lr=0.05)           # compiles with lr 0.05 (read at the first call)
    b.train_step(x, y, lr=0.05)
    b.train_step(x, y, lr=0.01)
    assert b.train_model.optimizer_pushes == [[0.01, 0.01]]
    assert all(g["lr"] == 0.01 for g in b.optimizer.param_groups)


def test_layer_decay_pushes_each_groups_scaled_rate(double):
    from vit_accel.engine.optim import build_optimizer as host_optimizer, set_lr

    r, b, m = small_backend(["optim.layer_decay=0.5"])
    b.setup(m)
    x, y = batch(16)
    b.train_step(x, y, lr=0.05)
    b.train_step(x, y, lr=0.01)
    host = host_optimizer(create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5), r.optim)
    set_lr(host, 0.01)    # what the cpu and gpu backends set: lr x 0.5 ** (depth + 1 - layer) per group
    assert b.train_model.optimizer_pushes == [[g["lr"] for g in host.param_groups]]
    assert len(set(b.train_model.optimizer_pushes[0])) == 6 and max(b.train_model.optimizer_pushes[0]) == 0.01
    assert all("lr_scale" not in g for g in b.optimizer.param_groups)  # PopTorch sees plain groups


def test_batch_contract(double):
    r, b, m = small_backend()
    b.setup(m)
    x, y = batch(12)
    with pytest.raises(ValueError, match=r"micro-batch 4 x accumulation 4 x local replicas 1 x device iterations 1 = 16"):
        b.train_step(x, y, 0.01)
    x10, y10 = batch(10)          # PopTorch takes any multiple of D x R x G = 4; 10 is none
    with pytest.raises(double.Error, match=r"Invalid batch dimension: .*\(10\) must be a multiple of"):
        b.train_model(b.prepare(x10), y10)
    b.train_step(*batch(16), lr=0.01)
    with pytest.raises(double.Error, match="Shape mismatch"):
        b.train_model(b.prepare(batch(32)[0]), batch(32)[1])


def test_output_modes_and_replicas(double):
    for mode, shape in (("final", (2,)), ("all", (2 * 2 * 3,))):
        r, b, m = small_backend([f"ipu.output_mode={mode}", "ipu.replicas=2", "ipu.gradient_accumulation=3",
                                 "ipu.device_iterations=2", "train.global_batch_size=24", "cpu.micro_batch_size=24",
                                 "gpu.micro_batch_size=24"])
        b.setup(m)
        assert b.batch_per_call == 4 * 3 * 2 * 2 and b.steps_per_call == 2
        x, y = batch(b.batch_per_call)
        logits, loss = b.train_model(b.prepare(x), y)
        assert tuple(loss.shape) == shape
        assert logits.shape[0] == (8 if mode == "final" else 48)


def test_eval_pads_trims_and_takes_turns_on_the_ipus(double):
    r, b, m = small_backend()
    b.setup(m)
    b.train_step(*batch(16), lr=0.05)
    x, _ = batch(5)
    logits = b.eval_step(x)
    assert logits.shape == (5, 5) and logits.dtype == torch.float32
    assert not b.train_model.isAttachedToDevice() and b.infer_model.isAttachedToDevice()
    ref = create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5, attn_impl="eager").eval()
    ref.load_state_dict(b.model_state_dict())
    torch.testing.assert_close(logits, ref((x.float() - 127.5) / 127.5), rtol=1e-5, atol=1e-5)
    assert m.training                                   # the host model stays in training mode
    b.train_step(*batch(16), lr=0.05)
    assert b.train_model.isAttachedToDevice() and not b.infer_model.isAttachedToDevice()
    logits2 = b.eval_step(x)                             # sees the weights of the second step
    assert not torch.allclose(logits, logits2)
    with pytest.raises(ValueError, match="compiled for 8"):
        b.eval_step(batch(9)[0])
    b.close()


@requires_cpu_half
def test_half_checkpoints_are_fp32_with_timm_keys(double, tmp_path):
    r, b, m = small_backend(["ipu.half=true", "ipu.partials_type=half", "ipu.accum_type=half",
                             "ipu.velocity_accum_type=half", "ipu.loss_scaling=256"])
    keys = set(create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5).state_dict())
    b.setup(m)
    assert m.patch_embed.proj.weight.dtype == torch.float16
    res = b.train_step(*batch(16), lr=0.05)
    assert torch.isfinite(torch.tensor(res.loss))
    sd = b.model_state_dict()
    assert set(sd) == keys and all(v.dtype == torch.float32 for v in sd.values())
    path = b.save_state(tmp_path / "step.pt", {"step": 1})

    r2, b2, m2 = small_backend(["ipu.half=true", "ipu.partials_type=half", "ipu.accum_type=half",
                                "ipu.velocity_accum_type=half", "ipu.loss_scaling=256"])
    b2.setup(m2)
    payload = b2.load_state(path)
    assert payload["backend"] == "ipu" and payload["step"] == 1
    for k, v in sd.items():
        torch.testing.assert_close(b2.model_state_dict()[k], v, rtol=0, atol=0)
    s1, s2 = b.optimizer.state_dict()["state"], b2.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and len(s1) > 0
    for i in s1:
        torch.testing.assert_close(s1[i]["momentum_buffer"], s2[i]["momentum_buffer"])


def test_loader_wrapping(double):
    r, b, m = small_backend(["ipu.loader_mode=async_rebatched"])
    b.setup(m)
    loader = [batch(16)]
    assert b.wrap_train_loader(loader) is loader          # no position to checkpoint: unchanged
    with pytest.raises(ConfigError, match="ipu.loader_mode: 'async' is not one of sync, async_rebatched"):
        small_backend(["ipu.loader_mode=async"])


# ---------------------------------------------------------------------------------------
# end to end: `vit-accel train --backend ipu --config vit-ti-digits` through the double
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_train_end_to_end(double, tmp_path, monkeypatch):
    from vit_accel.cli import main
    from vit_accel.engine.rundir import list_checkpoints

    monkeypatch.chdir(tmp_path)                           # data/ (the digits shards) and runs/ go here
    run = tmp_path / "run"
    rc = main(["train", "--backend", "ipu", "--config", "vit-ti-digits", "--set", "schedule.total_steps=2",
               "--set", "ipu.loader_mode=async_rebatched", "--set", "ipu.buffer_size=2",
               "--set", "schedule.warmup_steps=1", "--set", "train.eval_every=0", "--set", "data.workers=0",
               "--set", "train.eval_batch_size=256", "--run-dir", str(run), "--no-progress"])
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backend"] == "ipu" and summary["steps"] == 2 and 0.0 <= summary["val_top1"] <= 1.0
    ckpt = torch.load(list_checkpoints(run)[-1], map_location="cpu", weights_only=False)
    assert ckpt["backend"] == "ipu" and ckpt["model"]["pos_embed"].dtype == torch.float32
    assert sum(e[0] == "checkpoint" for e in double.events) > 0   # the plan ran: recompute points were hit


# ---------------------------------------------------------------------------------------
# real PopTorch only
# ---------------------------------------------------------------------------------------

@requires_poptorch
def test_real_poptorch_small_pipeline_trains():
    import poptorch

    assert IPUBackend.unavailable_reason() is None, IPUBackend.unavailable_reason()
    r, b, m = small_backend()
    b.setup(m)
    losses = [b.train_step(*batch(16), lr=0.05).loss for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert b.eval_step(batch(5)[0]).shape == (5, 5)
    assert poptorch.__version__
    b.close()
