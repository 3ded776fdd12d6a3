"""Checkpoint reading/writing: an independent reference (HF transformers), round trips through every
format, position-grid resampling, head handling, and clear errors for files that are no checkpoint."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

from vit_accel.checkpoints import (FORMATS, CheckpointError, add_convert_parser, add_inspect_parser,
                                   config_from_checkpoint, load_pretrained, model_from_checkpoint,
                                   resample_pos_embed, save_checkpoint)
from vit_accel.model import ViT, create_vit
from testkit import randomize

TINY = dict(img_size=32, patch_size=8, depth=2, num_classes=7)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kw) -> ViT:
    return randomize(create_vit("vit-ti16", **dict(TINY, **kw)))


def _logits(model, img=32, seed=1):
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------- HF transformers: the reference

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield


def _hf_model(hidden, heads, depth, img, patch, labels, bare=False):
    cfg = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                                 intermediate_size=4 * hidden, image_size=img, patch_size=patch, num_labels=labels)
    m = (transformers.ViTModel(cfg) if bare else transformers.ViTForImageClassification(cfg)).eval()
    return randomize(m, 0.1)  # perturb LayerNorms and biases too, so a swapped tensor shows


HF_SIZES = [(64, 4, 2, 32, 8, 7), (96, 3, 3, 48, 16, 13)]


@pytest.mark.parametrize("hidden, heads, depth, img, patch, labels", HF_SIZES)
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_hf_checkpoint_matches_transformers(tmp_path, hidden, heads, depth, img, patch, labels, attn_impl):
    hf = _hf_model(hidden, heads, depth, img, patch, labels)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits

    cfg = config_from_checkpoint(tmp_path / "hf", attn_impl=attn_impl)
    assert (cfg.width, cfg.num_heads, cfg.depth, cfg.img_size, cfg.patch_size, cfg.num_classes) == \
        (hidden, heads, depth, img, patch, labels)
    assert cfg.layer_norm_eps == 1e-12 and cfg.gelu_approximate == "none"  # HF: exact GELU, eps 1e-12
    model = ViT(cfg)
    report = load_pretrained(model, tmp_path / "hf")
    assert report.format == "hf" and not report.missing and not report.unexpected
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref, atol=1e-5, rtol=1e-5)


def test_hf_eps_mismatch_is_reported(tmp_path):
    _hf_model(64, 4, 2, 32, 8, 7).save_pretrained(tmp_path / "hf")
    model = create_vit("vit-ti16", width=64, num_heads=4, **TINY)  # our default eps 1e-6
    report = load_pretrained(model, tmp_path / "hf")
    assert any("layer_norm_eps is 1e-12" in n for n in report.notes)
    assert "layer_norm_eps" in str(report)


def test_hf_heads_mismatch_is_an_error(tmp_path):
    _hf_model(64, 4, 2, 32, 8, 7).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="4 attention heads, the model 2"):
        load_pretrained(create_vit("vit-ti16", width=64, num_heads=2, **TINY), tmp_path / "hf")


def test_hf_bare_vit_model_pooler_is_pre_logits(tmp_path):
    hf = _hf_model(64, 4, 2, 32, 8, 0, bare=True)
    hf.save_pretrained(tmp_path / "bare")
    model, report = model_from_checkpoint(tmp_path / "bare")
    assert model.cfg.representation_size == 64 and model.cfg.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), hf(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-5)


def test_hf_pytorch_model_bin_and_in_memory_names(tmp_path):
    hf = _hf_model(64, 4, 2, 32, 8, 7)
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    os.makedirs(tmp_path / "bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(load_file(str(tmp_path / "hf" / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    torch.save(hf.state_dict(), tmp_path / "memory.pth")  # transformers 5 module names, no config
    ref = _logits(model_from_checkpoint(tmp_path / "hf")[0])
    torch.testing.assert_close(_logits(model_from_checkpoint(tmp_path / "bin")[0]), ref)
    m, report = model_from_checkpoint(tmp_path / "memory.pth", num_heads=4, layer_norm_eps=1e-12)
    assert report.format == "hf"
    torch.testing.assert_close(_logits(m), ref)


def test_our_hf_output_loads_in_transformers(tmp_path):
    ours = _tiny(width=96, num_heads=3, num_classes=13)
    save_checkpoint(ours, tmp_path / "hf", format="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["ViTForImageClassification"] and cfg["hidden_act"] == "gelu"
    sizes = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], len(cfg["id2label"]))
    assert sizes == (96, 3, 384, 13)
    hf = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ours(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- round trips

DESTS = [("timm", "m.pth"), ("timm", "m.safetensors"), ("mmcls", "m.pth"), ("hf", "hfdir"),
         ("npz", "m.npz"), ("vit-accel", "m.safetensors")]


@pytest.mark.parametrize("fmt, name", DESTS)
@pytest.mark.parametrize("rep", [None, 192])
def test_round_trip(tmp_path, fmt, name, rep):
    src = _tiny(representation_size=rep, layer_norm_eps=1e-6)
    path = save_checkpoint(src, tmp_path / name, format=fmt)
    model, report = model_from_checkpoint(path)
    assert report.format == fmt
    assert not report.missing and not report.unexpected and not report.dropped and not report.resized
    assert model.cfg.representation_size == rep and model.cfg.num_classes == 7
    torch.testing.assert_close(_logits(model), _logits(src), atol=1e-6, rtol=0)
    # the explicit format reads the same file the same way
    again = create_vit("vit-ti16", representation_size=rep, **TINY)
    assert load_pretrained(again, path, format=fmt).loaded == len(src.state_dict())
    torch.testing.assert_close(_logits(again), _logits(src), atol=1e-6, rtol=0)


def test_own_format_keeps_the_whole_config(tmp_path):
    src = _tiny(global_pool="avg", gelu_approximate="tanh", layer_norm_eps=1e-5, qkv_bias=False, mlp_ratio=2.0)
    for fmt, name in [("vit-accel", "m.safetensors"), ("npz", "m.npz")]:
        cfg = config_from_checkpoint(save_checkpoint(src, tmp_path / name, format=fmt))
        for k in ("global_pool", "gelu_approximate", "layer_norm_eps", "qkv_bias", "mlp_ratio", "width", "depth"):
            assert getattr(cfg, k) == getattr(src.cfg, k), (fmt, k)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "vit-accel" and json.loads(meta["vit_config"])["layer_norm_eps"] == 1e-5


def test_training_checkpoint_loads_only_the_model(tmp_path):
    src = _tiny()
    cfg = dict(src.cfg.to_dict(), attn_impl="triton")  # saved on a GPU: must still open on a CPU
    torch.save({"format": "vit-accel-train", "model": src.state_dict(), "vit_config": cfg, "step": 5,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "rng": np.random.get_state()},
               tmp_path / "step.pt")
    model, report = model_from_checkpoint(tmp_path / "step.pt")
    assert report.format == "vit-accel" and model.cfg.attn_impl == "sdpa"
    torch.testing.assert_close(_logits(model), _logits(src))


_CALLS = []


def _side_effect(*args):
    _CALLS.append(args)


class _Hostile:
    """Like mmengine's message_hub: an object torch's weights_only loader refuses."""

    def __reduce__(self):
        return (_side_effect, ("ran code from a checkpoint",))


def test_pickled_objects_are_not_executed(tmp_path):
    src = _tiny()
    torch.save({"meta": {"epoch": 3}, "state_dict": src.state_dict(), "message_hub": _Hostile()}, tmp_path / "mm.pth")
    with pytest.raises(CheckpointError, match="refused: its pickle asks for test_checkpoints._side_effect.*"
                                              "nothing was imported or run"):
        load_pretrained(create_vit("vit-ti16", **TINY), tmp_path / "mm.pth")
    assert _CALLS == []


def test_timm_ddp_prefix_and_wrapped_dicts(tmp_path):
    src = _tiny()
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "a.pth")
    torch.save({"model": src.state_dict()}, tmp_path / "b.pth")
    for name in ("a.pth", "b.pth"):
        model, report = model_from_checkpoint(tmp_path / name)
        assert report.format == "timm"
        torch.testing.assert_close(_logits(model), _logits(src))


# ----------------------------------------------------------------------------- fc_norm (timm's avg-pool layout)

def test_fc_norm_normalizes_the_pooled_features_only():
    model = _tiny(global_pool="avg", fc_norm=True)
    sd = model.state_dict()
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)  # not normalized
        pooled = torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (64 * 3,), sd["fc_norm.weight"],
                                                sd["fc_norm.bias"], model.cfg.layer_norm_eps)
        torch.testing.assert_close(model(x), pooled @ sd["head.weight"].T + sd["head.bias"])
        plain = _tiny(global_pool="avg")
        assert not torch.allclose(plain.forward_features(x), plain.embed(x))  # the plain model normalizes tokens


@pytest.mark.parametrize("fmt, name", [("timm", "m.pth"), ("vit-accel", "m.safetensors")])
def test_fc_norm_checkpoint_is_recognized(tmp_path, fmt, name):
    src = _tiny(global_pool="avg", fc_norm=True)
    model, report = model_from_checkpoint(save_checkpoint(src, tmp_path / name, format=fmt))
    assert model.cfg.fc_norm and model.cfg.global_pool == "avg"
    assert not report.missing and not report.unexpected and not report.dropped
    torch.testing.assert_close(_logits(model), _logits(src), atol=1e-6, rtol=0)


def test_fc_norm_mismatch_drops_the_other_norm_and_says_so(tmp_path):
    plain = save_checkpoint(_tiny(), tmp_path / "plain.pth", format="timm")  # e.g. an MAE / in-21k backbone
    fc = create_vit("vit-ti16", global_pool="avg", fc_norm=True, **TINY)
    rep = load_pretrained(fc, plain)
    assert any(d.startswith("norm.weight") for d in rep.dropped) and rep.missing == ["fc_norm.bias", "fc_norm.weight"]
    assert any("no fc_norm" in n for n in rep.notes)
    back = load_pretrained(create_vit("vit-ti16", **TINY), save_checkpoint(fc, tmp_path / "fc.pth", format="timm"))
    assert any(d.startswith("fc_norm.weight") for d in back.dropped) and rep.loaded == back.loaded


@pytest.mark.parametrize("fmt", ["hf", "mmcls", "npz"])
def test_formats_without_fc_norm_refuse_it(tmp_path, fmt):
    with pytest.raises(CheckpointError, match="fc_norm"):
        save_checkpoint(_tiny(fc_norm=True), tmp_path / "out", format=fmt)


# ----------------------------------------------------------------------------- foreign layouts

def test_mmcls_names_and_backbone_only(tmp_path):
    src = _tiny(representation_size=192)
    save_checkpoint(src, tmp_path / "mm.pth", format="mmcls")
    ck = torch.load(tmp_path / "mm.pth", weights_only=True)
    sd = ck["state_dict"]
    for k in ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.projection.weight",
              "backbone.layers.1.ln1.weight", "backbone.layers.1.attn.qkv.weight", "backbone.layers.1.attn.proj.bias",
              "backbone.layers.1.ln2.bias", "backbone.layers.1.ffn.layers.0.0.weight",
              "backbone.layers.1.ffn.layers.1.weight", "backbone.ln1.weight", "head.layers.pre_logits.weight",
              "head.layers.head.weight"):
        assert k in sd, k
    assert isinstance(ck["meta"], dict)
    # what mmcv's load_checkpoint(prefix="backbone") hands over: no prefix, no head
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    torch.save(backbone, tmp_path / "backbone.pth")
    model = create_vit("vit-ti16", **dict(TINY, num_classes=1000))
    report = load_pretrained(model, tmp_path / "backbone.pth")
    assert report.format == "mmcls"
    assert report.missing == ["head.bias", "head.weight"] and not report.unexpected
    assert any("no head in the checkpoint" in n for n in report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), src.forward_features(x))


def test_npz_uses_google_layout(tmp_path):
    src = _tiny()
    save_checkpoint(src, tmp_path / "m.npz", format="npz")
    with np.load(tmp_path / "m.npz") as z:
        w = {k: z[k] for k in z.files}
    blk = "Transformer/encoderblock_1/"
    shapes = {"embedding/kernel": (8, 8, 3, 192), "cls": (1, 1, 192), "head/kernel": (192, 7),
              "Transformer/posembed_input/pos_embedding": (1, 17, 192), "Transformer/encoder_norm/scale": (192,),
              blk + "MultiHeadDotProductAttention_1/query/kernel": (192, 3, 64),
              blk + "MultiHeadDotProductAttention_1/value/bias": (3, 64),
              blk + "MultiHeadDotProductAttention_1/out/kernel": (3, 64, 192),
              blk + "LayerNorm_0/scale": (192,), blk + "LayerNorm_2/bias": (192,),
              blk + "MlpBlock_3/Dense_0/kernel": (192, 768), blk + "MlpBlock_3/Dense_1/kernel": (768, 192)}
    for k, shape in shapes.items():
        assert w[k].shape == shape, k
    # flax computes x @ kernel: check the transposes against torch's Linear/Conv by value
    sd = src.state_dict()
    x = np.random.RandomState(0).randn(5, 192).astype(np.float32)
    fc1 = torch.nn.functional.linear(torch.from_numpy(x), sd["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.bias"])
    np.testing.assert_allclose(x @ w[blk + "MlpBlock_3/Dense_0/kernel"] + w[blk + "MlpBlock_3/Dense_0/bias"],
                               fc1.numpy(), atol=1e-5)
    q = np.einsum("nd,dhk->nhk", x, w[blk + "MultiHeadDotProductAttention_1/query/kernel"])
    np.testing.assert_allclose(q.reshape(5, 192), x @ sd["blocks.1.attn.qkv.weight"][:192].numpy().T, atol=1e-5)


def _to_big_vision(w, scanned):
    """Rewrite vit_jax names as big_vision's (optionally scanned) layout."""
    out = {}
    for k, v in w.items():
        k = (k.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
             .replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0"))
        if k == "Transformer/posembed_input/pos_embedding":
            k, v = "pos_embedding", v[:, 1:]  # big_vision adds no position to the class token
        out["params/" + k] = v
    if scanned:
        blocks = sorted({k.split("/")[2] for k in out if "encoderblock_" in k})
        for key in [k for k in out if "/encoderblock_0/" in k]:
            stacked = np.stack([out.pop(key.replace("encoderblock_0", b)) for b in blocks])
            out[key.replace("encoderblock_0", "encoderblock")] = stacked
    return out


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_npz(tmp_path, scanned):
    src = _tiny()
    with torch.no_grad():
        src.pos_embed[:, 0] = 0  # what big_vision's layout can express
    save_checkpoint(src, tmp_path / "m.npz", format="npz")
    with np.load(tmp_path / "m.npz") as z:
        w = {k: z[k] for k in z.files if not k.startswith("vit_accel/")}
    np.savez(tmp_path / "bv.npz", **_to_big_vision(w, scanned))
    model, report = model_from_checkpoint(tmp_path / "bv.npz")
    assert report.format == "npz" and not report.missing and not report.unexpected
    assert model.cfg.num_heads == 3 and model.cfg.depth == 2
    torch.testing.assert_close(_logits(model), _logits(src), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- fitting to another model

def test_position_grid_is_resampled(tmp_path):
    src = _tiny()
    with torch.no_grad():
        src.pos_embed[:, 1:] = 0.25  # a constant grid must stay constant under bicubic resampling
    path = save_checkpoint(src, tmp_path / "m.safetensors", format="timm")
    model = create_vit("vit-ti16", **dict(TINY, img_size=48))
    report = load_pretrained(model, path)
    assert model.pos_embed.shape == (1, 1 + 36, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], src.pos_embed[:, 0])  # class token unchanged
    torch.testing.assert_close(model.pos_embed[:, 1:], torch.full((1, 36, 192), 0.25))
    assert len(report.resized) == 1 and "4x4 -> 6x6" in report.resized[0]
    m384, _ = model_from_checkpoint(path, img_size=48)  # the 224 -> 384 fine-tuning path
    assert m384.cfg.img_size == 48 and _logits(m384, img=48).shape == (2, 7)


def test_resample_matches_interpolate_and_same_grid_is_identity():
    pos = torch.randn(1, 1 + 16, 8)
    torch.testing.assert_close(resample_pos_embed(pos, 4), pos)
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expect = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resample_pos_embed(pos, 6)[:, 1:], expect.permute(0, 2, 3, 1).reshape(1, 36, 8))


def test_head_is_dropped_on_class_mismatch(tmp_path):
    path = save_checkpoint(_tiny(), tmp_path / "m.pth", format="timm")
    model = create_vit("vit-ti16", **dict(TINY, num_classes=10))
    head_before = model.head.weight.clone()
    report = load_pretrained(model, path)
    assert torch.equal(model.head.weight, head_before)
    assert len(report.dropped) == 2 and "7 classes, the model 10" in report.dropped[0]
    assert "head.weight" not in report.missing
    no_head = create_vit("vit-ti16", **dict(TINY, num_classes=0))
    assert any("num_classes=0" in d for d in load_pretrained(no_head, path).dropped)


def test_pre_logits_presence_mismatch(tmp_path):
    path = save_checkpoint(_tiny(representation_size=192), tmp_path / "m.pth", format="timm")
    report = load_pretrained(create_vit("vit-ti16", **TINY), path)
    dropped = " ".join(report.dropped)
    assert "pre_logits.fc.weight" in dropped and "no pre_logits" in dropped and "head.weight" in dropped
    path2 = save_checkpoint(_tiny(), tmp_path / "n.pth", format="timm")
    report = load_pretrained(create_vit("vit-ti16", representation_size=192, **TINY), path2)
    assert report.missing == ["pre_logits.fc.bias", "pre_logits.fc.weight"]


def test_shape_mismatch_names_tensors_and_shapes(tmp_path):
    path = save_checkpoint(_tiny(), tmp_path / "m.pth", format="timm")
    model = create_vit("vit-ti16", mlp_ratio=2.0, **TINY)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(model, path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and str(path) in msg
    assert "blocks.0.mlp.fc1.weight: checkpoint (768, 192) vs model (384, 192)" in msg
    assert "blocks.1.mlp.fc2.weight: checkpoint (192, 768) vs model (192, 384)" in msg
    report = load_pretrained(model, path, strict_shapes=False)
    assert len(report.dropped) == 6 and report.loaded == len(model.state_dict()) - 6
    assert not report.missing and "blocks.0.mlp.fc1.weight (768, 192): the model has (384, 192)" in report.dropped[0]


def test_heads_come_from_the_table_or_an_override(tmp_path):
    path = save_checkpoint(_tiny(width=64, num_heads=4), tmp_path / "m.pth", format="timm")
    with pytest.raises(CheckpointError, match="pass num_heads="):
        config_from_checkpoint(path)
    assert config_from_checkpoint(path, num_heads=4).num_heads == 4
    full = save_checkpoint(create_vit("vit-ti16", img_size=32, num_classes=5), tmp_path / "ti.pth", format="timm")
    cfg = config_from_checkpoint(full)
    assert (cfg.name, cfg.num_heads, cfg.img_size, cfg.num_classes) == ("vit-ti16", 3, 32, 5)


def test_variant_name_comes_from_shapes_not_metadata(tmp_path):
    shallow = save_checkpoint(_tiny(), tmp_path / "shallow.safetensors")  # metadata says name "vit-ti16"
    assert config_from_checkpoint(shallow).name == "custom"  # but 2 blocks is no vit-ti16
    full = save_checkpoint(create_vit("vit-s16", img_size=32), tmp_path / "full.safetensors")
    assert config_from_checkpoint(full).name == "vit-s16"


def test_position_table_that_is_no_square_grid(tmp_path):
    sd = _tiny().state_dict()
    sd["pos_embed"] = sd["pos_embed"][:, :-1]  # 1 + 15 tokens
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="16 tokens, not a class token"):
        config_from_checkpoint(tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="odd.pth: pos_embed has 15 grid tokens"):
        load_pretrained(create_vit("vit-ti16", **TINY), tmp_path / "odd.pth")


# ----------------------------------------------------------------------------- bad inputs

def _bad_files(tmp_path):
    good = save_checkpoint(_tiny(), tmp_path / "good.pth", format="timm")
    raw = open(good, "rb").read()
    files = {
        "truncated.pth": raw[: len(raw) // 2],
        "random.pth": os.urandom(4096),
        "random.safetensors": os.urandom(4096),
        "random.npz": os.urandom(4096),
        "random.bin": os.urandom(4096),
        "empty.pth": b"",
        "config.json": b'{"hidden_size": 64}',
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    os.makedirs(tmp_path / "emptydir")
    torch.save({"epoch": 3}, tmp_path / "nostate.pth")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "notvit.pth")
    return list(files) + ["emptydir", "nostate.pth", "notvit.pth", "missing.pth"]


def test_bad_files_raise_checkpoint_error_naming_the_path(tmp_path):
    model = create_vit("vit-ti16", **TINY)
    for name in _bad_files(tmp_path):
        with pytest.raises(CheckpointError) as e:
            load_pretrained(model, tmp_path / name)
        assert str(tmp_path / name) in str(e.value), name
        assert "\n" not in str(e.value)
    assert "empty" in str(pytest.raises(CheckpointError, load_pretrained, model, tmp_path / "empty.pth").value)
    assert "config.json" in str(pytest.raises(CheckpointError, load_pretrained, model, tmp_path / "emptydir").value)


def test_format_argument_is_checked(tmp_path):
    path = save_checkpoint(_tiny(), tmp_path / "m.pth", format="timm")
    model = create_vit("vit-ti16", **TINY)
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'tf'"):
        load_pretrained(model, path, format="tf")
    with pytest.raises(CheckpointError, match="not mmcls's"):
        load_pretrained(model, path, format="mmcls")
    with pytest.raises(CheckpointError, match="npz"):
        load_pretrained(model, path, format="npz")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        save_checkpoint(model, tmp_path / "x", format="onnx")


# ----------------------------------------------------------------------------- CLI pieces

def _cli(*argv):
    parser = argparse.ArgumentParser(prog="vit-accel")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_convert_parser(sub)
    add_inspect_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.mark.parametrize("to", FORMATS)
def test_cli_convert(tmp_path, capsys, to):
    src = _tiny()
    path = save_checkpoint(src, tmp_path / "src.safetensors", format="vit-accel")
    dst = tmp_path / ("out" if to == "hf" else "out." + {"npz": "npz", "vit-accel": "safetensors"}.get(to, "pth"))
    assert _cli("convert", path, dst, "--to", to) == 0
    assert "wrote" in capsys.readouterr().out
    model, report = model_from_checkpoint(dst)
    assert report.format == to
    torch.testing.assert_close(_logits(model), _logits(src))


def test_cli_inspect(tmp_path, capsys):
    model = create_vit("vit-ti16", img_size=32, num_classes=5, representation_size=192)
    path = save_checkpoint(model, tmp_path / "m.npz", format="npz")
    assert _cli("inspect", path, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "npz" and info["variant"] == "vit-ti16"
    assert (info["img_size"], info["patch_size"], info["num_classes"], info["representation_size"]) == (32, 16, 5, 192)
    assert info["parameters"] == model.num_params()
    assert _cli("inspect", path) == 0
    assert "{:,}".format(model.num_params()) in capsys.readouterr().out


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(os.urandom(256))
    assert _cli("inspect", tmp_path / "junk.pth") == 2
    assert _cli("convert", tmp_path / "junk.pth", tmp_path / "o.pth", "--to", "timm") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(str(tmp_path / "junk.pth") in line and "error" in line for line in err)
    assert not (tmp_path / "o.pth").exists()
