"""Parity with timm: a timm ViT's state dict loads into ours with equal logits, and ours,
saved as timm, loads back into timm. timm and torchvision are in the pinned test environment
(`pip install -e '.[test]'`), so this runs in every `make test`; tools/gpu_check.sh runs it on
GPU hosts too.
"""
import pytest
import torch

from vit_accel.checkpoints import model_from_checkpoint, save_checkpoint
from testkit import randomize

timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[test]' (or '.[timm]')")

pytestmark = pytest.mark.usefixtures("one_thread")


TIMM_MODELS = [("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=7)),
               ("vit_small_patch16_224", dict(img_size=48, depth=3, num_classes=13, global_pool="avg"))]


@pytest.mark.parametrize("name, kw", TIMM_MODELS + [("vit_base_patch16_224", {"img_size": 224})],
                         ids=["tiny-small", "small-avg-small", "base-224-full-size"])
def test_timm_model_loads_with_equal_logits(tmp_path, name, kw):
    ref = randomize(timm.create_model(name, pretrained=False, **kw), 0.1)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    model, report = model_from_checkpoint(tmp_path / "timm.pth")
    assert report.format == "timm" and not report.missing and not report.unexpected and not report.dropped
    assert model.cfg.global_pool == kw.get("global_pool", "token") and model.cfg.fc_norm == ("global_pool" in kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        ours, theirs = model.eval()(x), ref(x)
    assert ours.shape == theirs.shape == (2, kw.get("num_classes", 1000))
    assert (ours - theirs).abs().max().item() <= 1e-5
    # and ours, saved as timm, loads into timm
    back = timm.create_model(name, pretrained=False, **kw).eval()
    back.load_state_dict(torch.load(save_checkpoint(model, tmp_path / "ours.pth", format="timm")))
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), atol=1e-5, rtol=1e-5)
