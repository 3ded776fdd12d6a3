"""Mixup / CutMix per micro-batch, as the sources mix each device's loader batch (engine/mixing.py).

Each micro-batch of a call is mixed alone from a seed of (seed, rank, step, micro-batch), and every
backend trains each micro-batch on exactly the mix made for it: the CPU/GPU step loop (and ZeRO,
which runs the same ``micro_batches`` and ``loss_fn``), and PopTorch's combined batch, read as
``[device iteration, accumulation, replica, micro-batch]`` (tests/poptorch_double.py).
"""
import sys
from types import SimpleNamespace

import pytest
import torch

import poptorch_double
from test_ipu import SMALL
from vit_accel.config import ConfigError, load_recipe
from vit_accel.engine.mixing import MicroBatchMix, micro_batch_mix, micro_batch_seed
from vit_accel.model import create_vit

pytest.importorskip("timm.data.mixup", reason="Mixup comes from timm")
from vit_accel.data import BatchMix  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n, size=8):
    """Image i is the constant 2 i + 1: a mixed pixel tells which two images met and with what weight."""
    return torch.stack([torch.full((3, size, size), 2.0 * i + 1) for i in range(n)]).to(torch.uint8)


def _fake_backend(micro, per_call, steps_per_call=1, name="cpu"):
    return SimpleNamespace(name=name, micro_batch_size=micro, batch_per_call=per_call, steps_per_call=steps_per_call)


def _recipe(mixup=0.8, cutmix=0.0, extra=()):
    return load_recipe("vit-ti-digits", [f"data.mixup={mixup}", f"data.cutmix={cutmix}", "optim.label_smoothing=0.1",
                                         *extra])


def test_each_micro_batch_is_mixed_alone_from_its_own_seed():
    r = _recipe()
    mix = micro_batch_mix(r, _fake_backend(4, 16), rank=3)
    images, labels = _images(16), torch.arange(16) % 10
    x, t = mix(images, labels, step=7)
    alone = BatchMix(10, 0.8, 0.0, smoothing=0.1, batch_size=4)
    lams = []
    for k in range(4):
        part = slice(4 * k, 4 * k + 4)
        want_x, want_t = alone(images[part], labels[part], micro_batch_seed(r.train.seed, 3, 7, k))
        assert torch.equal(x[part], want_x) and torch.equal(t[part], want_t)
        # mixup: image i of the micro-batch meets its reversed partner in the same micro-batch, nothing else
        a, b = images[part].float(), images[part].flip(0).float()
        lam = ((x[part] - b) / (a - b)).flatten(1)[0, 0].item()
        torch.testing.assert_close(x[part], lam * a + (1 - lam) * b)
        lams.append(lam)
    assert len(set(round(v, 6) for v in lams)) == 4            # one lambda per micro-batch, not per call
    assert torch.equal(mix(images, labels, step=7)[0], x)      # a function of (seed, rank, step): resume is exact
    assert not torch.equal(mix(images, labels, step=8)[0], x)


def test_a_call_of_several_steps_mixes_each_with_its_own_step():
    """IPU device iterations: a call of 2 steps x 2 micro-batches; the third micro-batch is step + 1's first."""
    r = _recipe(cutmix=1.0)
    mix = micro_batch_mix(r, _fake_backend(4, 16, steps_per_call=2, name="ipu"), rank=0)
    images, labels = _images(16), torch.arange(16) % 10
    x, _ = mix(images, labels, step=10)
    alone = BatchMix(10, 0.8, 1.0, smoothing=0.1, batch_size=4)
    for k, (step, index) in enumerate([(10, 0), (10, 1), (11, 0), (11, 1)]):
        part = slice(4 * k, 4 * k + 4)
        assert torch.equal(x[part], alone(images[part], labels[part], micro_batch_seed(r.train.seed, 0, step, index))[0])


def test_an_odd_micro_batch_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"micro-batches of 5: set an even cpu.micro_batch_size"):
        micro_batch_mix(_recipe(), _fake_backend(5, 10), rank=0)
    assert micro_batch_mix(_recipe(mixup=0.0), _fake_backend(5, 10), rank=0) is None


def test_seeds_differ_across_rank_step_and_micro_batch():
    seeds = {micro_batch_seed(42, rank, step, j) for rank in range(4) for step in range(50) for j in range(64)}
    assert len(seeds) == 4 * 50 * 64 and all(0 <= s < 2 ** 63 for s in seeds)


class _Recorder:
    """Stands in for engine.loss.training_loss in a backend module: records each micro-batch's targets."""

    def __init__(self, loss):
        self.loss, self.targets = loss, []

    def __call__(self, logits, target, smoothing=0.0):
        self.targets.append(target.detach().clone())
        return self.loss(logits, target, smoothing)


def test_cpu_step_trains_each_micro_batch_on_its_own_mix(monkeypatch):
    from vit_accel.backends import cpu as cpu_mod
    from vit_accel.backends.cpu import CPUBackend

    r = load_recipe("vit-ti-digits", ["data.mixup=0.8", "train.global_batch_size=16", "cpu.micro_batch_size=4"],
                    backends=["cpu"])
    backend = CPUBackend(r)
    backend.setup(create_vit("vit-ti16", img_size=8, patch_size=4, depth=1, num_classes=10))
    assert (backend.micro_batch_size, backend.gradient_accumulation) == (4, 4)
    mix = micro_batch_mix(r, backend, rank=0)
    x, t = mix(_images(16), torch.arange(16) % 10, step=0)
    rec = _Recorder(cpu_mod.training_loss)
    monkeypatch.setattr(cpu_mod, "training_loss", rec)
    backend.train_step(x, t, lr=0.01)
    assert len(rec.targets) == 4
    assert all(torch.equal(got, t[4 * k:4 * k + 4]) for k, got in enumerate(rec.targets))


def test_ipu_call_trains_each_micro_batch_on_its_own_mix(monkeypatch):
    """2 device iterations x accumulation 4 x 2 replicas of micro-batch 2: PopART's [D, G, R, micro]
    layout is the order the mix made them in, each micro-batch on the targets mixed for it."""
    from vit_accel.backends import ipu as ipu_mod
    from vit_accel.backends.ipu import IPUBackend

    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    monkeypatch.delenv("POPTORCH_IPU_MODEL", raising=False)
    r = load_recipe("vit-ti-digits", SMALL + ["ipu.micro_batch_size=2", "ipu.replicas=2", "ipu.device_iterations=2",
                                              "data.mixup=0.8", "data.cutmix=1.0"])
    backend = IPUBackend(r)
    backend.setup(create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5,
                             **backend.model_options()))
    assert (backend.batch_per_call, backend.steps_per_call) == (32, 2)
    mix = micro_batch_mix(r, backend, rank=0)
    assert mix.per_step == 8
    images, labels = _images(32, size=16), torch.arange(32) % 5
    x, t = mix(images, labels, step=6)
    rec = _Recorder(ipu_mod.training_loss)
    monkeypatch.setattr(ipu_mod, "training_loss", rec)
    backend.train_step(x, t, lr=0.01)
    assert len(rec.targets) == 16
    assert all(torch.equal(got, t[2 * k:2 * k + 2]) for k, got in enumerate(rec.targets))
    # the micro-batches of the second device iteration were mixed with step 7's seeds
    alone = BatchMix(5, 0.8, 1.0, batch_size=2)
    assert torch.equal(t[16:18], alone(images[16:18], labels[16:18], micro_batch_seed(r.train.seed, 0, 7, 0))[1])


def test_micro_batch_mix_rejects_a_batch_that_is_no_whole_number_of_micro_batches():
    mix = MicroBatchMix(BatchMix(10, 0.8, 0.0, batch_size=4), 4, 2, 42, 0)
    with pytest.raises(ValueError, match="not a whole number of micro-batches of 4"):
        mix(_images(10), torch.arange(10), step=0)
