"""Every converted-weight row of the seed tables (table A) has a recipe that builds the row's model.

Per row: the recipe's model has the published parameter count (to 0.005 M); its model equals timm's
model of that name (random init, nothing downloaded) both ways at the row's resolution (width and
depth cut to keep it fast; the structure that matters -- patching, qkv bias, eps, pooling, stem -- is
the row's); its eval preprocessing equals timm's / mmcls's; `vit-accel plan --json` reports the same
parameters, tokens and FLOPs on every backend; and `vit-accel eval` runs the recipe end to end on
tiny shards with weights in the row's native format.
"""
import functools
import io
import json
import math
import tarfile
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from vit_accel.backends.pipeline import model_config
from vit_accel.checkpoints import load_pretrained, save_checkpoint
from vit_accel.cli import main
from vit_accel.config import list_configs, load_recipe, vit_options
from vit_accel.data.fastpath import eval_sample
from vit_accel.data.transforms import eval_resize_size, eval_transform, normalize
from vit_accel.model import ViT, create_vit
from testkit import randomize

timm = pytest.importorskip("timm", reason="timm is not installed (the environment issue installs it)")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# row of reference/seed-rows.md table A -> (recipe, source, the source's name); timm's model of today
ROWS = {
    "ViT-B16 in21k pre-trained": ("vit-b16-in21k-224", "mmcls", "vit-base-p16_3rdparty_pt-64xb64_in1k-224"),
    "ViT-B32 in21k pre-trained": ("vit-b32-in21k-224", "mmcls", "vit-base-p32_3rdparty_pt-64xb64_in1k-224"),
    "ViT-L16 in21k pre-trained": ("vit-l16-in21k-224", "mmcls", "vit-large-p16_3rdparty_pt-64xb64_in1k-224"),
    "ViT-B16 in21k -> in1k": ("vit-b16-ft-384", "mmcls", "configs/vision_transformer/vit-base-p16_ft-64xb64_in1k-384.py"),
    "ViT-B32 in21k -> in1k": ("vit-b32-ft-384", "mmcls", "configs/vision_transformer/vit-base-p32_ft-64xb64_in1k-384.py"),
    "ViT-L16 in21k -> in1k": ("vit-l16-ft-384", "mmcls", "configs/vision_transformer/vit-large-p16_ft-64xb64_in1k-384.py"),
    "vit_base_patch16_224": ("timm-vit-b16-224", "timm", "vit_base_patch16_224"),
    "vit_base_patch16_384": ("timm-vit-b16-384", "timm", "vit_base_patch16_384"),
    "vit_base_patch32_384": ("timm-vit-b32-384", "timm", "vit_base_patch32_384"),
    "vit_base_resnet50_384": ("timm-vit-b16-r50-384", "timm", "vit_base_resnet50_384"),
    "vit_large_patch16_224": ("timm-vit-l16-224", "timm", "vit_large_patch16_224"),
    "vit_large_patch16_384": ("timm-vit-l16-384", "timm", "vit_large_patch16_384"),
    "vit_small_patch16_224": ("timm-vit-s16-orig-224", "timm", "vit_small_patch16_224"),
}
RECIPES = [r for r, _, _ in ROWS.values()]
TIMM_TODAY = {"vit_base_resnet50_384": "vit_base_r50_s16_384"}  # timm >= 0.9 renamed the hybrid
TIMM_ROWS = [(r, name) for r, src, name in ROWS.values() if src == "timm"]


def _meta_model(recipe, img_size=None) -> ViT:
    opts = vit_options(recipe.model)
    if img_size:
        opts["img_size"] = img_size
    with torch.device("meta"):  # counting needs no memory
        return create_vit(recipe.model.name, **opts)


def test_every_row_has_a_recipe_that_names_it():
    have = set(list_configs())
    assert set(RECIPES) <= have
    for row, (name, source, src_name) in ROWS.items():
        rp = load_recipe(name).reproduces
        assert (rp.source, rp.name) == (source, src_name), row
        assert rp.params_m and rp.flops_g and rp.resolution in (224, 384)


@pytest.mark.parametrize("name", RECIPES)
def test_train_refuses_an_evaluation_row_in_one_line(name, capsys):
    """The rows publish converted weights: their sources' training settings (vit-b16-ft-384's config: AdamW
    3e-3, a 10k-iteration warm-up, 300 epochs, batch 4,096) are not what the recipe could train with."""
    assert load_recipe(name).reproduces.evaluation
    assert main(["train", "--config", name, "--backend", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{name} is an evaluation row" in err
    assert f"vit-accel eval --config {name} --checkpoint FILE" in err


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_model_has_the_published_parameter_count(name):
    r = load_recipe(name)
    rp = r.reproduces
    # mmcls's in21k rows list the 384 px fine-tuned model's numbers (params_resolution says so)
    res = rp.params_resolution or rp.resolution
    model = _meta_model(r, res)
    assert model.cfg.img_size == res and r.model.img_size == rp.resolution
    assert abs(model.num_params() / 1e6 - rp.params_m) <= 0.005, (model.num_params(), rp.params_m)


def test_recipes_build_the_variant_they_name():
    """The original small ViT's recipe gets every option of its variant (eps, softmax scale, no qkv bias)."""
    small = model_config(load_recipe("timm-vit-s16-orig-224"))
    assert (small.qk_scale, small.qkv_bias, small.layer_norm_eps, small.num_heads) == (768 ** -0.5, False, 1e-5, 8)
    assert model_config(load_recipe("timm-vit-b16-r50-384")).hybrid_layers == (3, 4, 9)


# ----------------------------------------------------------------------------- timm parity per row

def _timm_row_model(row_name, **kw):
    if row_name == "vit_small_patch16_224":  # timm 0.3.2's, which today's registry replaced (see test_hybrid_parity)
        return VisionTransformer(patch_size=16, embed_dim=768, num_heads=8, mlp_ratio=3.0, qkv_bias=False,
                                 norm_layer=partial(nn.LayerNorm, eps=1e-5), **kw)
    return timm.create_model(TIMM_TODAY.get(row_name, row_name), pretrained=False, **kw)


@pytest.mark.parametrize("recipe, row_name", [t for t in TIMM_ROWS if t[1] != "vit_small_patch16_224"])
def test_timm_row_logits_both_ways(tmp_path, recipe, row_name):
    """A timm model of the row's name at the row's resolution (width 64, depth 1) and the recipe's model of
    the same size give equal logits, loading in either direction. The original small ViT's softmax scale is
    checked in test_hybrid_parity (today's timm class cannot express it)."""
    r = load_recipe(recipe)
    small = dict(embed_dim=64, depth=1, num_heads=4)
    ref = randomize(_timm_row_model(row_name, img_size=r.model.img_size, **small))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    ours = create_vit(r.model.name, **dict(vit_options(r.model), width=64, depth=1, num_heads=4))
    rep = load_pretrained(ours, str(tmp_path / "timm.pth"))
    assert rep.loaded == len(ref.state_dict()) and not rep.missing and not rep.dropped
    x = torch.randn(1, 3, r.model.img_size, r.model.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours.eval()(x), want, atol=1e-5, rtol=1e-5)
        back = _timm_row_model(row_name, img_size=r.model.img_size, **small).eval()
        back.load_state_dict(torch.load(save_checkpoint(ours, tmp_path / "ours.pth", format="timm")), strict=True)
        torch.testing.assert_close(back(x), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- eval preprocessing

def _jpeg(seed, size):
    rng = np.random.RandomState(seed)
    arr = (rng.rand(size[1] // 4, size[0] // 4, 3) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).resize(size, Image.BILINEAR).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("name", [r for r, src, _ in ROWS.values() if src == "timm"])
def test_timm_rows_preprocess_as_timm(name):
    """Our eval path (resize, center crop, normalize) equals timm's eval transform of the row's
    pretrained_cfg (crop_pct, interpolation, mean, std) on a non-square image."""
    from timm.data import create_transform

    r = load_recipe(name)
    d, img = r.data, r.model.img_size
    crop_pct = d.eval_crop_fraction
    mean, std = [m / 255 for m in d.mean], [s / 255 for s in d.std]
    tf = create_transform(input_size=img, is_training=False, crop_pct=crop_pct,
                          interpolation=d.eval_interpolation or d.interpolation, mean=mean, std=std)
    data = _jpeg(1, (img + 77, img + 31))
    want = tf(Image.open(io.BytesIO(data)).convert("RGB"))
    resize = eval_resize_size(img, d.eval_resize, d.eval_crop_fraction)
    assert resize == math.floor(img / crop_pct)
    hwc = eval_transform(data, img, resize=resize, interpolation=d.eval_interpolation or d.interpolation)
    got = normalize(torch.from_numpy(hwc.copy()).permute(2, 0, 1)[None], d.mean, d.std)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the loader's form resizes with torch (torchvision's tensor Resize): within a level or two of PIL's
    chw = torch.empty((3, img, img), dtype=torch.uint8)
    eval_sample(data, chw, img, resize=resize, interpolation=d.eval_interpolation or d.interpolation)
    diff = (normalize(chw[None], d.mean, d.std)[0] - want).abs() * min(d.std)  # in levels of 255
    assert diff.max() <= 2.01 and (diff > 0.01).float().mean() <= 0.01


def test_eval_preprocessing_keys_are_checked():
    from vit_accel.config import ConfigError

    with pytest.raises(ConfigError, match="data.eval_crop_fraction"):
        load_recipe("timm-vit-b16-224", ["data.eval_crop_fraction=1.5"])
    with pytest.raises(ConfigError, match="both set the resize"):
        load_recipe("timm-vit-b16-224", ["data.eval_resize=256"])
    with pytest.raises(ConfigError, match="data.eval_interpolation: 'nearest' is not one of"):
        load_recipe("timm-vit-b16-224", ["data.eval_interpolation=nearest"])


# ----------------------------------------------------------------------------- CLI: configs, plan

def test_configs_cli_shows_published_numbers(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "timm-vit-b16-r50-384" in out and "84.99" in out and "98.95" in out and "97.77" in out
    assert main(["configs", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert set(RECIPES) <= set(items)
    for name in RECIPES:
        assert items[name]["reproduces"] == json.loads(json.dumps(load_recipe(name).reproduces.__dict__))
    assert items["timm-vit-b16-224"]["eval"]["crop_fraction"] == 0.9


@functools.lru_cache(maxsize=None)
def _torch_flops(name, pins=()) -> int:
    """FLOPs of one image's forward as torch's own counter (torch.utils.flop_counter) counts them:
    2 per multiply-add of every matrix product and convolution, the attention's included."""
    from torch.utils.flop_counter import FlopCounterMode

    r = load_recipe(name, list(pins))
    with torch.device("meta"):
        model = create_vit(r.model.name, **dict(vit_options(r.model), attn_impl="eager")).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, r.model.img_size, r.model.img_size, device="meta"))
    return counter.get_total_flops()


@pytest.mark.parametrize("backend", ["cpu", "gpu", "ipu"])
def test_plan_json_for_every_recipe(capsys, backend):
    for name in sorted(list_configs()):
        # a recipe whose model comes from the user's files ('auto') is planned with one pinned
        pins = ["model.name=vit-b16", "model.img_size=224", "model.num_classes=100"] if name == "finetune" else []
        sets = [a for p in pins for a in ("--set", p)]
        assert main(["plan", "--config", name, "--backend", backend, "--json", *sets]) == 0, name
        rep = json.loads(capsys.readouterr().out)
        model = _meta_model(load_recipe(name, pins))
        assert rep["params"] == model.num_params(), name
        assert rep["tokens_per_image"] == model.pos_embed.shape[1], name
        assert rep["flops_per_image"] == _torch_flops(name, tuple(pins)), name
        if backend != "cpu":
            assert sum(e["params"] for e in rep["estimates"]) == rep["params"], name
        if model.cfg.hybrid_layers and backend == "ipu":
            assert rep["stem_stage"] == 0 and rep["plan"]["stages"][0]["patch_embed"]


# ----------------------------------------------------------------------------- published FLOPs

# timm's model index at 224 px printed 4, 2 and 3 times its own count for these rows (at 384 px 1x):
# the count itself must match; the multiple is the index's, recorded here.
TIMM_INDEX_MULTIPLE = {"vit_base_patch16_224": 4, "vit_large_patch16_224": 2, "vit_small_patch16_224": 3}


def mmcv_module_counts(model: nn.Module, res: int):
    """Multiply-adds per module as mmcv 1.x's get_model_complexity_info counts them (the counter mmcls
    0.x published its FLOPs with), one image at ``res`` on the meta device: its hooks on the module
    types it knows, matched by exact type; our LayerNorm (an nn.LayerNorm subclass) gets its norm hook."""
    from mmcv.cnn.utils import flops_counter as fc

    model = fc.add_flops_counting_methods(model)
    model.eval()
    model.start_flops_count()
    extra = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and not fc.is_supported_instance(m):
            m.__flops__ = 0
            extra.append(m.register_forward_hook(fc.norm_flops_counter_hook))
    with torch.no_grad():
        model(torch.empty(1, 3, res, res, device="meta"))
    counts = {n: (type(m), m.__flops__) for n, m in model.named_modules() if hasattr(m, "__flops__")}
    model.stop_flops_count()
    for h in extra:
        h.remove()
    return counts


def test_mmcvs_counter_does_not_see_torch_multihead_attention():
    """Why mmcls's published FLOPs leave the attention out: its ViT (before 2021-10's refactor, when the
    numbers were published) used torch.nn.MultiheadAttention, a module type mmcv's counter has no hook for."""
    from mmcv.cnn import get_model_complexity_info

    flops, _ = get_model_complexity_info(_MHA(nn.MultiheadAttention(8, 2)), (5, 8), print_per_layer_stat=False,
                                         as_strings=False)
    assert flops == 0
    flops, _ = get_model_complexity_info(nn.Linear(8, 8), (5, 8), print_per_layer_stat=False, as_strings=False)
    assert flops == 5 * 8 * 8


class _MHA(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x)[0]


@pytest.mark.parametrize("row", list(ROWS))
def test_published_flops_as_each_source_counts_them(row):
    """Our model of every row, counted the way its source counted: the published number to its last digit.

    mmcls 0.x: mmcv's counter (convolutions with their bias, Linear, LayerNorm), the attention left out
    (above); the in-21k rows publish the 384 px model's numbers. timm's model index: the multiply-adds of
    nn.Linear and nn.Conv2d modules (attention products, norms and the hybrid's weight-standardized
    ResNet stem not counted), times the index's multiple."""
    recipe, source, name = ROWS[row]
    r = load_recipe(recipe)
    res = r.reproduces.params_resolution or r.reproduces.resolution
    counts = mmcv_module_counts(_meta_model(r, res), res)
    if source == "mmcls":
        macs = sum(f for n, (_, f) in counts.items() if ".attn." not in n)
    else:
        macs = sum(f for _, (t, f) in counts.items() if t in (nn.Linear, nn.Conv2d))
        macs *= TIMM_INDEX_MULTIPLE.get(name, 1)
    assert abs(macs / 1e9 - r.reproduces.flops_g) <= 0.005, (row, macs / 1e9, r.reproduces.flops_g)


# ----------------------------------------------------------------------------- eval end to end

def _val_tar(path, n=3):
    with tarfile.open(path, "w") as t:
        for i in range(n):
            for ext, data in (("jpg", _jpeg(i, (300 + 20 * i, 260))), ("cls", str(i).encode())):
                info = tarfile.TarInfo("s%03d.%s" % (i, ext))
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return str(path)


def _native_checkpoint(tmp_path, recipe, source, src_name):
    """Depth-1 weights of the row's model, in the format the row's published file has."""
    r = load_recipe(recipe)
    if source == "timm" and src_name == "vit_base_resnet50_384":  # Google's R50+ViT-B_16.npz layout
        ours = create_vit(r.model.name, **dict(vit_options(r.model), depth=1))
        return save_checkpoint(ours, tmp_path / "R50+ViT-B_16.npz", format="npz")
    if source == "timm":
        ref = _timm_row_model(src_name, img_size=r.model.img_size, depth=1)
        path = tmp_path / ("timm.safetensors" if "384" in src_name else "timm.pth")
        sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
        if path.suffix == ".pth":
            torch.save(sd, path)
        else:
            from safetensors.torch import save_file

            save_file(sd, str(path))
        return str(path)
    # mmcls: a full classifier, or the in21k backbone without an ImageNet-1k head
    no_head = "in21k" in recipe
    ours = create_vit(r.model.name, **dict(vit_options(r.model), depth=1, num_classes=0 if no_head else 1000))
    return save_checkpoint(ours, tmp_path / "mmcls.pth", format="mmcls")


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_eval_recipe_runs_end_to_end(tmp_path, capsys, row):
    """`vit-accel eval --config ROW --checkpoint FILE` on tiny shards on the CPU: the recipe's own
    preprocessing, its model at the row's resolution (depth 1 to keep it quick), weights in the row's
    native format read with no conversion step."""
    recipe, source, src_name = ROWS[row]
    ckpt = _native_checkpoint(tmp_path, recipe, source, src_name)
    val = _val_tar(tmp_path / "val-000000.tar")
    rc = main(["eval", "--config", recipe, "--backend", "cpu", "--checkpoint", ckpt, "--json",
               "--set", "model.depth=1", "--set", f"data.val_shards={val}", "--set", "data.workers=0",
               "--set", "train.eval_batch_size=2"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["val_count"] == 3 and 0.0 <= res["val_top1"] <= res["val_top5"] <= 1.0
    assert math.isfinite(res["val_loss"])
    if "in21k" in recipe:
        assert "no head in the checkpoint" in out


README_COMMANDS = [
    "vit-accel eval --config timm-vit-b16-r50-384 --checkpoint jx_vit_base_resnet50_384-9fd3c705.pth "
    "--set data.val_shards=/data/imagenet/val-{000000..000063}.tar",
    "vit-accel configs --json",
    "vit-accel plan --backend cpu --config timm-vit-b16-r50-384 --json",
    "vit-accel plan --backend ipu --config timm-vit-b16-r50-384",
]


@pytest.mark.parametrize("cmd", README_COMMANDS)
def test_readme_commands_parse(cmd):
    import os
    import shlex

    from vit_accel.cli import build_parser

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().replace("\\\n", "")
    assert " ".join(cmd.split()) in " ".join(readme.split())
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert callable(args.func)


def test_ipu_runs_the_hybrid_stem_on_the_first_stage(monkeypatch):
    """The recipe's plan applied with the PopTorch test double: the ResNet stem's convolutions run
    inside the first BeginBlock (stage 0, IPU 0), before the second stage starts."""
    import sys

    import poptorch_double
    from vit_accel.backends.ipu import apply_plan
    from vit_accel.backends.pipeline import build_plan

    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    poptorch_double.events.clear()
    r = load_recipe("timm-vit-b16-r50-384")
    with torch.device("meta"):
        model = create_vit(r.model.name, attn_impl="eager", **vit_options(r.model))
    apply_plan(model, build_plan(r), poptorch_double)
    stem = model.patch_embed.backbone
    stem.stem.conv.register_forward_hook(lambda *a: poptorch_double.events.append(("stem-start",)))
    stem.stages[-1].register_forward_hook(lambda *a: poptorch_double.events.append(("stem-end",)))
    model(torch.empty(1, 3, 384, 384, device="meta"))
    kinds = [e[0] if e[0] != "block" else e[1:] for e in poptorch_double.events if e[0] != "checkpoint"]
    assert kinds[:4] == [("stage0:patch_embed", 0), "stem-start", "stem-end", ("stage1:blocks.1", 1)]


def test_mmpretrain_file_with_its_normalization_buffers_loads(tmp_path):
    """mmpretrain 1.x checkpoints carry data_preprocessor.mean/std beside the weights: not model tensors,
    so not a reason to refuse; a truly foreign tensor is."""
    from vit_accel.checkpoints import CheckpointError

    src = create_vit("vit-ti16", img_size=32, patch_size=8, depth=1, num_classes=5)
    path = save_checkpoint(src, tmp_path / "mm.pth", format="mmcls")
    obj = torch.load(path)
    obj["state_dict"]["data_preprocessor.mean"] = torch.full((3, 1, 1), 127.5)
    obj["state_dict"]["data_preprocessor.std"] = torch.full((3, 1, 1), 127.5)
    torch.save(obj, path)
    model = create_vit("vit-ti16", img_size=32, patch_size=8, depth=1, num_classes=5)
    rep = load_pretrained(model, str(path))
    assert rep.loaded == len(model.state_dict()) and not rep.missing
    obj["state_dict"]["backbone.extra_adapter.weight"] = torch.zeros(4)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="has 1 tensors that a mmcls model does not have: "
                                              "backbone.extra_adapter.weight"):
        load_pretrained(model, str(path))
