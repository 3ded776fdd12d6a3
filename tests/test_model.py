"""The ViT module tree: sizes, shapes, op choices that must not change the state dict, bad configs."""
import importlib

import pytest
import torch

from vit_accel.model import VARIANTS, DropPath, ViT, count_macs, create_vit, vit_config

TINY = dict(img_size=32, patch_size=8, depth=2, num_classes=7)


pytestmark = pytest.mark.usefixtures("one_thread")


def _on_meta(name, **kw) -> ViT:
    with torch.device("meta"):  # no memory, no init cost: enough to count parameters
        return create_vit(name, **kw)


def _seeded_weights(model: ViT) -> ViT:
    """The default init zeroes the head; random weights make every comparison meaningful."""
    gen = torch.Generator().manual_seed(0)  # the same weights whatever ran before
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            # LayerNorm gains near 1: gains near 0 would shrink every output towards zero
            p.copy_(noise + 1.0 if ("norm" in name and name.endswith("weight")) else noise)
    return model.eval()


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name, img, expected", [
    ("vit-b16", 224, 86_567_656),   # timm vit_base_patch16_224
    ("vit-b16", 384, 86_859_496),   # 86.86 M: only the position table grows
    ("vit-l16", 224, 304_326_632),  # timm vit_large_patch16_224
])
def test_parameter_counts_match_timm(name, img, expected):
    assert _on_meta(name, img_size=img).num_params() == expected


def test_a_model_on_the_meta_device_is_not_initialized(monkeypatch):
    """Sizes only (inspect, plan): the init would fill nothing, and its ops import torch._dynamo (a second)."""
    called = []
    monkeypatch.setattr(ViT, "init_weights", lambda self: called.append(self))
    _on_meta("vit-ti16", **TINY)
    assert called == []
    create_vit("vit-ti16", **TINY)
    assert len(called) == 1


def test_vit_b16_flops():
    cfg = vit_config("vit-b16")
    macs = count_macs(cfg)
    assert abs(macs / 1e9 - 17.56) < 0.01  # the commonly quoted 17.56 GMACs at 224
    assert _on_meta("vit-b16").flops() == 2 * macs


def test_flops_grow_with_resolution_and_head():
    base = count_macs(vit_config("vit-b16"))
    assert count_macs(vit_config("vit-b16", img_size=384)) > 2.9 * base  # ~(577/197) in the blocks
    extra = count_macs(vit_config("vit-b16", representation_size=768)) - base
    assert extra == 768 * 768


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_builds(name):
    width, depth, heads, mlp_ratio, patch = VARIANTS[name]
    m = _on_meta(name)
    assert (m.cfg.width, m.cfg.depth, m.cfg.num_heads, m.cfg.patch_size) == (width, depth, heads, patch)
    assert len(m.blocks) == depth
    assert m.blocks[0].mlp.fc1.weight.shape == (int(width * mlp_ratio), width)
    stride = patch * (16 if m.cfg.hybrid_layers else 1)  # the R50 stem reduces 16x before its 1x1 patches
    assert m.pos_embed.shape == (1, 1 + (224 // stride) ** 2, width)


# ----------------------------------------------------------------------------- forward

def test_forward_shapes():
    m = create_vit("vit-ti16", **TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    assert m(x).shape == (3, 7)
    assert m.forward_features(x).shape == (3, 1 + 16, 192)


def test_wrong_input_size_is_a_clear_error():
    m = create_vit("vit-ti16", **TINY)
    with pytest.raises(ValueError, match="48x48.*32x32"):
        m(torch.randn(1, 3, 48, 48))


def test_eager_and_sdpa_give_the_same_logits():
    eager = _seeded_weights(create_vit("vit-ti16", attn_impl="eager", **TINY))
    sdpa = create_vit("vit-ti16", attn_impl="sdpa", **TINY).eval()
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = eager(x), sdpa(x)
    assert a.abs().max() > 0.1  # not a trivially zero output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_global_pool_avg_pools_patch_tokens():
    m = _seeded_weights(create_vit("vit-ti16", global_pool="avg", **TINY))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        expected = m.head(feats[:, 1:].mean(dim=1))
        torch.testing.assert_close(m(x), expected)
        assert not torch.allclose(m(x), m.head(feats[:, 0]))  # and not the class token


def test_pos_embed_std_sets_the_init_scale_only():
    torch.manual_seed(0)
    default = create_vit("vit-ti16", **TINY).pos_embed.std().item()
    wide = create_vit("vit-ti16", pos_embed_std=0.5, **TINY)
    assert abs(default - 0.02) < 0.004 and abs(wide.pos_embed.std().item() - 0.5) < 0.05
    assert wide.pos_embed.abs().max() <= 2.0
    assert set(wide.state_dict()) == set(create_vit("vit-ti16", **TINY).state_dict())


def test_representation_size_adds_pre_logits():
    plain = create_vit("vit-ti16", **TINY)
    rep = create_vit("vit-ti16", representation_size=96, **TINY)
    extra = set(rep.state_dict()) - set(plain.state_dict())
    assert extra == {"pre_logits.fc.weight", "pre_logits.fc.bias"}
    assert rep.head.weight.shape == (7, 96)
    _seeded_weights(rep)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = rep.head(torch.tanh(rep.pre_logits.fc(rep.forward_features(x)[:, 0])))
        torch.testing.assert_close(rep(x), expected)


def test_num_classes_zero_returns_features():
    m = _seeded_weights(create_vit("vit-ti16", **dict(TINY, num_classes=0)))
    x = torch.randn(2, 3, 32, 32)
    assert not any(k.startswith("head.") for k in m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.forward_features(x)[:, 0])


@pytest.mark.parametrize("kw, match", [
    (dict(img_size=30, patch_size=8), "not a multiple of patch_size"),
    (dict(attn_impl="flash"), "attn_impl must be one of"),
    (dict(norm_impl="apex"), "norm_impl must be one of"),
    (dict(mlp_impl="fused"), "mlp_impl must be one of"),
    (dict(num_heads=5), "not divisible by num_heads"),
    (dict(global_pool="max"), "global_pool"),
    (dict(num_classes=-1), "num_classes"),
])
def test_bad_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        vit_config("vit-ti16", **kw)


def test_unknown_variant_and_option_raise():
    with pytest.raises(ValueError, match="unknown ViT variant 'vit-x16'"):
        vit_config("vit-x16")
    with pytest.raises(TypeError, match="num_clases"):
        vit_config("vit-ti16", num_clases=10)


# ----------------------------------------------------------------------------- op choices

def test_state_dict_keys_do_not_depend_on_attention_impl():
    keys = {impl: list(create_vit("vit-ti16", attn_impl=impl, **TINY).state_dict()) for impl in ("eager", "sdpa")}
    assert keys["eager"] == keys["sdpa"]


def _kernels_importable():
    try:
        for mod in ("attention", "layer_norm", "bias_gelu"):
            importlib.import_module("vit_accel_kernels." + mod)
        return True, ""
    except Exception as e:  # triton missing or the kernels package not installed
        return False, "kernels package does not import here: %s" % e


def test_state_dict_keys_do_not_depend_on_triton_ops():
    ok, why = _kernels_importable()
    if not ok:
        pytest.skip(why)
    torch_ops = create_vit("vit-ti16", **TINY).state_dict()
    triton_ops = create_vit("vit-ti16", attn_impl="triton", norm_impl="triton", mlp_impl="triton", **TINY).state_dict()
    assert list(torch_ops) == list(triton_ops)
    assert all(torch_ops[k].shape == triton_ops[k].shape for k in torch_ops)


def test_triton_ops_match_torch_ops():
    """The whole model with the Triton kernels (under TRITON_INTERPRET=1 from conftest when there is
    no CUDA device, so the kernels really run) against the torch ops: the wiring, not just keys."""
    ok, why = _kernels_importable()
    if not ok:
        pytest.skip(why)
    ref = _seeded_weights(create_vit("vit-ti16", **TINY))
    tri = create_vit("vit-ti16", attn_impl="triton", norm_impl="triton", mlp_impl="triton", **TINY).eval()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tri(x), ref(x), atol=1e-5, rtol=1e-5)


def test_triton_ops_are_recorded_on_the_modules():
    ok, why = _kernels_importable()
    if not ok:
        pytest.skip(why)
    m = create_vit("vit-ti16", attn_impl="triton", norm_impl="torch", mlp_impl="triton", **TINY)
    blk = m.blocks[0]
    assert (blk.attn.impl, blk.norm1.impl, blk.mlp.impl) == ("triton", "torch", "triton")
    assert "impl=triton" in repr(blk.attn) and "impl=torch" in repr(blk.norm1)


def _without_triton_device(monkeypatch):
    """This process as one with neither a CUDA device nor the interpreter (the kernels package reads
    TRITON_INTERPRET once, at import: its flag is what the model and the launchers check)."""
    monkeypatch.setattr(importlib.import_module("vit_accel_kernels"), "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("op,portable", [("attn_impl", "sdpa"), ("norm_impl", "torch"), ("mlp_impl", "torch")])
def test_triton_where_it_cannot_run_is_an_error_at_construction(monkeypatch, op, portable):
    ok, why = _kernels_importable()
    if not ok:
        pytest.skip(why)
    _without_triton_device(monkeypatch)
    with pytest.raises(ValueError, match=f"{op}='triton' needs a CUDA device .* choose {op}='{portable}'") as e:
        create_vit("vit-ti16", **{op: "triton"}, **TINY)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("op,launcher", [("attn_impl", "flash_attention"), ("norm_impl", "layer_norm"),
                                         ("mlp_impl", "bias_gelu")])
def test_triton_model_fed_cpu_tensors_without_interpreter_fails_in_the_launcher(monkeypatch, op, launcher):
    """Built where the kernels run, then given CPU tensors where they cannot: the launcher says so
    (no silent switch to the torch ops)."""
    ok, why = _kernels_importable()
    if not ok:
        pytest.skip(why)
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    tri = create_vit("vit-ti16", **{op: "triton"}, **TINY).eval()
    _without_triton_device(monkeypatch)
    with pytest.raises(ValueError, match=f"{launcher}: tensors must be on a CUDA device"):
        tri(torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------- stochastic depth

def test_drop_path_unit():
    dp = DropPath(0.5).train()
    y = dp(torch.ones(1000, 4, 8))
    per_sample = y[:, 0, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # dropped, or kept and rescaled by 1/keep
    assert 0.35 < (per_sample == 0).float().mean() < 0.65
    assert torch.equal(y, y[:, :1, :1].expand_as(y))  # one decision per sample
    dp.eval()
    x = torch.randn(4, 4, 8)
    assert torch.equal(dp(x), x)


def test_drop_path_train_vs_eval():
    m = _seeded_weights(create_vit("vit-ti16", drop_path_rate=0.5, **TINY))
    ref = create_vit("vit-ti16", **TINY).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref(x))  # eval: stochastic depth is off
        m.train()
        assert not torch.allclose(m(x), m(x))  # train: a different random path each call
    assert m.blocks[0].drop_path.p == 0.0 and m.blocks[-1].drop_path.p == 0.5  # linear in depth
