"""The converted-weight models against timm: the R50 hybrid and timm's original small ViT.

Randomly initialized timm models (``pretrained=False``, nothing downloaded) saved the way timm saves
them give our logits, and ours saved as timm give timm's (fp32, 1e-5). Small widths and depths keep
it fast; the full-size hybrid runs one forward. Google's ``.npz`` layout is checked against timm's own
npz reader (``timm.models.vision_transformer._load_weights``).
"""
from functools import partial

import pytest
import torch
import torch.nn as nn

from vit_accel.checkpoints import (CheckpointError, inspect_checkpoint, load_pretrained, model_from_checkpoint,
                                   save_checkpoint)
from vit_accel.hybrid import stem_counts
from vit_accel.model import create_vit
from testkit import randomize

timm = pytest.importorskip("timm", reason="timm is not installed (the environment issue installs it)")
from safetensors.torch import save_file  # noqa: E402
from timm.models.vision_transformer import VisionTransformer, _load_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_HYBRID = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def _x(img, n=2, seed=3):
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(seed))


def _timm_hybrid(**kw):
    return timm.create_model("vit_base_r50_s16_384", pretrained=False, **kw)


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_timm_hybrid_file_gives_timm_logits_both_ways(tmp_path, ext):
    ref = randomize(_timm_hybrid(**SMALL_HYBRID))
    path = tmp_path / ("timm." + ext)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(sd, path) if ext == "pth" else save_file(sd, str(path))
    model, rep = model_from_checkpoint(path, num_heads=4)  # timm files do not record heads
    assert model.cfg.hybrid_layers == (3, 4, 9) and model.cfg.img_size == 64 and model.cfg.patch_size == 1
    assert not rep.missing and not rep.unexpected and rep.loaded == len(sd)
    x = _x(64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    back = _timm_hybrid(**SMALL_HYBRID).eval()
    back.load_state_dict(torch.load(save_checkpoint(model, tmp_path / "ours.pth", format="timm")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), atol=1e-5, rtol=1e-5)


def test_hybrid_position_grid_resamples(tmp_path):
    ref = randomize(_timm_hybrid(**SMALL_HYBRID))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    model = create_vit("vit-b16-r50", img_size=96, width=64, depth=2, num_heads=4, num_classes=10)
    rep = load_pretrained(model, str(tmp_path / "timm.pth"))
    assert rep.resized and "4x4 -> 6x6" in rep.resized[0] and not rep.missing
    assert model(_x(96, n=1)).shape == (1, 10)


def test_google_npz_of_the_hybrid_matches_timms_reader(tmp_path):
    """Ours written as Google's R50+ViT-B_16 .npz: timm's npz loader reads it into a timm hybrid with
    the same logits, and our reader reads it back."""
    ours = randomize(create_vit("vit-b16-r50", img_size=64, width=64, depth=2, num_heads=4, num_classes=10))
    path = save_checkpoint(ours, tmp_path / "R50+ViT-B_16.npz", format="npz")
    ref = _timm_hybrid(**SMALL_HYBRID).eval()
    _load_weights(ref, path)
    x = _x(64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), atol=1e-5, rtol=1e-5)
    again, rep = model_from_checkpoint(path)
    assert rep.format == "npz" and not rep.unexpected and not rep.missing
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_full_size_hybrid_matches_timm(tmp_path):
    """The row's own model: 98.95 M parameters and timm's logits at 384 (one image); inspect reads a
    timm vit_base_r50_s16_384 file as the hybrid (it once said "img_size 24, patch_size 1")."""
    torch.manual_seed(0)
    ref = _timm_hybrid().eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "r50.safetensors"))
    info = inspect_checkpoint(str(tmp_path / "r50.safetensors"))
    assert (info["variant"], info["img_size"], info["patch_size"], info["hybrid_layers"], info["num_heads"],
            info["parameters"]) == ("vit-b16-r50", 384, 1, [3, 4, 9], 12, 98_950_952)
    ours = create_vit("vit-b16-r50", img_size=384)
    assert ours.num_params() == sum(p.numel() for p in ref.parameters()) == 98_950_952
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _x(384, n=1)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-5, rtol=1e-5)


def test_plain_vit_refuses_a_hybrid_file_naming_the_stem(tmp_path):
    torch.save(_timm_hybrid(**SMALL_HYBRID).state_dict(), tmp_path / "timm.pth")
    plain = create_vit("vit-b16", img_size=64, width=64, depth=2, num_heads=4, num_classes=10, patch_size=16)
    with pytest.raises(CheckpointError, match=r"has 156 tensors that a timm model does not have: "
                                              r"patch_embed\.backbone\.\* \(156 tensors\)"):
        load_pretrained(plain, str(tmp_path / "timm.pth"))


def test_hybrid_refuses_a_file_without_its_stem(tmp_path):
    sd = _timm_hybrid(**SMALL_HYBRID).state_dict()
    torch.save({k: v for k, v in sd.items() if ".stages.2." not in k}, tmp_path / "cut.pth")
    model = create_vit("vit-b16-r50", img_size=64, width=64, depth=2, num_heads=4, num_classes=10)
    with pytest.raises(CheckpointError, match=r"lacks \d+ tensors the model needs: patch_embed\.backbone\.\*"):
        load_pretrained(model, str(tmp_path / "cut.pth"))


def test_stem_flops_match_torch_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = create_vit("vit-b16-r50", img_size=64, width=64, depth=1, num_heads=4).patch_embed.backbone
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(_x(64, n=1))
    convs = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    assert convs == 2 * stem_counts((3, 4, 9), 3, 64)["macs"]
    assert sum(p.numel() for p in model.parameters()) == stem_counts((3, 4, 9), 3, 64)["params"]


# ----------------------------------------------------------------------------- timm's original small ViT

def _orig_small_timm(**kw):
    """timm 0.3.2's vit_small_patch16_224 as today's timm class expresses it: width 768, 8 heads,
    mlp_ratio 3, no qkv bias, nn.LayerNorm (eps 1e-5). Today's class cannot take its softmax scale
    (qk_scale = 768 ** -0.5 rather than head_dim ** -0.5): the test folds the ratio of the two
    scales into timm's query weights, which is exactly equivalent with no qkv bias."""
    return VisionTransformer(patch_size=16, embed_dim=768, num_heads=8, mlp_ratio=3.0, qkv_bias=False,
                             norm_layer=partial(nn.LayerNorm, eps=1e-5), **kw)


def _fold_scale(sd, width, heads, depth, factor):
    sd = dict(sd)
    for i in range(depth):
        w = sd["blocks.%d.attn.qkv.weight" % i].clone()
        w[:width] *= factor
        sd["blocks.%d.attn.qkv.weight" % i] = w
    return sd


def test_original_small_vit_matches_timm_both_ways(tmp_path):
    kw = dict(img_size=32, depth=2, num_classes=10)
    ref = randomize(_orig_small_timm(**kw))
    torch.save(ref.state_dict(), tmp_path / "vit_small_p16.pth")
    model = create_vit("vit-s16-orig", **kw)
    assert model.cfg.qk_scale == 768 ** -0.5
    load_pretrained(model, str(tmp_path / "vit_small_p16.pth"))
    factor = (768 ** -0.5) / (96 ** -0.5)
    oracle = _orig_small_timm(**kw).eval()
    oracle.load_state_dict(_fold_scale(ref.state_dict(), 768, 8, 2, factor))
    x = _x(32)
    with torch.no_grad():
        want = oracle(x)
        for impl in ("sdpa", "eager"):
            m = create_vit("vit-s16-orig", attn_impl=impl, **kw).eval()
            m.load_state_dict(model.state_dict())
            torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    back = _orig_small_timm(**kw).eval()
    back.load_state_dict(_fold_scale(torch.load(save_checkpoint(model, tmp_path / "o.pth", format="timm")),
                                     768, 8, 2, factor))
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_full_size_original_small_vit_is_recognized(tmp_path):
    """A full-size file of the original vit_small_patch16_224 builds vit-s16-orig with its scale and eps."""
    ref = _orig_small_timm(img_size=224, depth=8)
    assert sum(p.numel() for p in ref.parameters()) == 48_754_408
    torch.save(ref.state_dict(), tmp_path / "vit_small_p16_224.pth")
    model, rep = model_from_checkpoint(tmp_path / "vit_small_p16_224.pth")
    assert (model.cfg.name, model.cfg.num_heads, model.cfg.qk_scale, model.cfg.layer_norm_eps) == \
        ("vit-s16-orig", 8, 768 ** -0.5, 1e-5)
    assert model.num_params() == 48_754_408 and not rep.missing and not rep.unexpected


@pytest.mark.parametrize("name, kw", [
    ("vit-b16-r50", dict(img_size=32, width=64, depth=1, num_heads=2, num_classes=5)),
    ("vit-s16-orig", dict(img_size=32, width=64, depth=1, num_heads=2, num_classes=5, qk_scale=64 ** -0.5))])
def test_kernel_ops_give_the_torch_ops_logits(name, kw):
    """What the GPU backend builds (Triton attention with the variant's softmax scale, LayerNorm, bias +
    GELU; the stem stays torch convolutions) computes what the CPU path does: under the Triton
    interpreter here, on CUDA tensors where a GPU is present."""
    pytest.importorskip("triton")
    ref = randomize(create_vit(name, **kw))
    fused = create_vit(name, attn_impl="triton", norm_impl="triton", mlp_impl="triton", **kw).eval()
    fused.load_state_dict(ref.state_dict())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = _x(32)
    with torch.no_grad():
        torch.testing.assert_close(fused.to(dev)(x.to(dev)).cpu(), ref(x), atol=1e-4, rtol=1e-4)
