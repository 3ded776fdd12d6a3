"""Parity with timm: a timm ViT's state dict loads into ours with equal logits, and ours,
saved as timm, loads back into timm. Needs timm, which needs torchvision: the CPU torch build
that `make test` installs has none, so here these tests skip; the GPU hosts have timm, and
tools/gpu_check.sh runs this file there.
"""
import pytest
import torch

from vit_accel.checkpoints import model_from_checkpoint, save_checkpoint

timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision, which the CPU torch build "
                                          "here lacks); tools/gpu_check.sh runs these on GPU hosts")

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model, std=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)  # perturb LayerNorms and biases too, so a swapped tensor shows
    return model.eval()


TIMM_MODELS = [("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=7)),
               ("vit_small_patch16_224", dict(img_size=48, depth=3, num_classes=13, global_pool="avg"))]


@pytest.mark.parametrize("name, kw", TIMM_MODELS)
def test_timm_model_loads_with_equal_logits(tmp_path, name, kw):
    ref = _randomize(timm.create_model(name, pretrained=False, **kw), 0.1)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    model, report = model_from_checkpoint(tmp_path / "timm.pth")
    assert report.format == "timm" and not report.missing and not report.unexpected and not report.dropped
    assert model.cfg.global_pool == kw.get("global_pool", "token") and model.cfg.fc_norm == ("global_pool" in kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), atol=1e-5, rtol=1e-5)
    # and ours, saved as timm, loads into timm
    back = timm.create_model(name, pretrained=False, **kw).eval()
    back.load_state_dict(torch.load(save_checkpoint(model, tmp_path / "ours.pth", format="timm")))
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), atol=1e-5, rtol=1e-5)
