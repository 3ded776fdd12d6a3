"""The training loss: one function (engine/loss.py), torch's and timm's numbers, on every backend."""
import sys

import pytest
import torch
import torch.nn.functional as F

import poptorch_double
from vit_accel.config import load_recipe
from vit_accel.engine.loss import training_loss
from vit_accel.model import create_vit


def test_training_loss_is_torchs_cross_entropy_for_indices_and_soft_targets():
    logits, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    for s in (0.0, 0.1):
        want = F.cross_entropy(logits, y, label_smoothing=s)
        torch.testing.assert_close(training_loss(logits, y, s), want)
        torch.testing.assert_close(training_loss(logits, y.int(), s), want)     # PopTorch's int32 labels
    soft = torch.softmax(torch.randn(6, 7), -1)
    torch.testing.assert_close(training_loss(logits, soft), F.cross_entropy(logits, soft))
    # mixed targets already carry the smoothing: the recipe's label_smoothing is not applied twice
    torch.testing.assert_close(training_loss(logits, soft, 0.1), F.cross_entropy(logits, soft))
    # fp16 logits: the log-softmax in fp32, the result fp32
    half = logits.half()
    out = training_loss(half, y, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(half.float(), y, label_smoothing=0.1))


def test_timms_soft_target_cross_entropy():
    timm_loss = pytest.importorskip("timm.loss", reason="timm is the oracle here")
    logits = torch.randn(5, 10)
    soft = torch.softmax(torch.randn(5, 10) * 3, -1)
    torch.testing.assert_close(training_loss(logits, soft), timm_loss.SoftTargetCrossEntropy()(logits, soft))


@pytest.mark.parametrize("loss_name", ["ce", "soft_ce"])
def test_every_backend_trains_on_the_same_loss(monkeypatch, loss_name):
    """The CPU/GPU step loop and ZeRO call ``CPUBackend.loss_fn``; the IPU graph holds ``TrainingWrapper``.
    Both give ``training_loss`` with the recipe's smoothing, whichever name ``optim.loss`` has."""
    from vit_accel.backends.cpu import CPUBackend
    from vit_accel.backends.ipu import TrainingWrapper

    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    recipe = load_recipe("vit-ti-digits", [f"optim.loss={loss_name}", "optim.label_smoothing=0.1"])
    model = create_vit("vit-ti16", img_size=16, patch_size=8, depth=1, num_classes=10).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    soft = torch.softmax(torch.randn(4, 10), -1)
    with torch.no_grad():
        logits = model(x)
        cpu = CPUBackend(recipe)
        for target in (y, soft):
            want = training_loss(logits, target, 0.1)
            assert torch.equal(cpu.loss_fn(logits, target), want)
            _, ipu = TrainingWrapper(model, recipe.optim.label_smoothing)(x, target.int() if target is y else target)
            assert torch.equal(ipu, want)
