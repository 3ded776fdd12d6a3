"""Recipes: loading, overrides, typed errors, batch arithmetic, schedule values."""
import math

import pytest

from vit_accel.config import ConfigError, batch_split, list_configs, load_recipe
from vit_accel.engine.optim import build_optimizer, param_groups
from vit_accel.engine.schedule import lr_at
from vit_accel.model import create_vit


def test_every_recipe_loads_and_has_a_description():
    names = list_configs()
    assert {"vit-b16-ft", "vit-b16-ft-384", "vit-ti-digits"} <= set(names)
    for name, desc in names.items():
        assert desc, f"{name} has no description"
        load_recipe(name)


def test_vit_b16_ft_carries_the_published_recipe():
    r = load_recipe("vit-b16-ft")
    assert (r.model.name, r.model.img_size, r.model.drop_rate) == ("vit-b16", 224, 0.1)
    assert (r.optim.name, r.optim.lr, r.optim.momentum, r.optim.weight_decay) == ("sgd", 0.08, 0.9, 1e-5)
    assert r.optim.no_decay == ["cls_token", "pos_embed"]
    assert (r.schedule.warmup_steps, r.schedule.total_steps, r.schedule.warmup_start_factor) == (800, 5000, 0.02)
    assert r.train.seed == 42 and r.data.mean == [127.5] * 3 and r.data.std == [127.5] * 3
    assert r.ipu.micro_batch_size * r.ipu.gradient_accumulation * r.ipu.replicas == 2176
    assert r.train.global_batch_size == 2176
    for sec in (r.cpu, r.gpu):
        assert 2176 % sec.micro_batch_size == 0


def test_unknown_key_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr.*valid keys in optim: name, lr"):
        load_recipe("vit-ti-digits", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown section 'optm'"):
        load_recipe("vit-ti-digits", ["optm.lr=0.1"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'fast'"):
        load_recipe("vit-ti-digits", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.seed: expected int, got 1\.5"):
        load_recipe("vit-ti-digits", ["train.seed=1.5"])
    with pytest.raises(ConfigError, match=r"optim.name: 'lamb' is not one of sgd, adamw"):
        load_recipe("vit-ti-digits", ["optim.name=lamb"])


def test_overrides_are_typed():
    r = load_recipe("vit-b16-ft", ["optim.lr=3e-4", "ipu.splits=[patch_embed, blocks.6]", "optim.nesterov=true",
                                   "ipu.replicas=2", "ipu.gradient_accumulation=64"])
    assert r.optim.lr == 3e-4 and r.optim.nesterov is True
    assert r.ipu.splits == ["patch_embed", "blocks.6"]


def test_batch_arithmetic_errors_show_the_arithmetic():
    with pytest.raises(ConfigError, match=r"17 x gradient_accumulation 32 x replicas 2 = 1088.*2176"):
        load_recipe("vit-b16-ft", ["ipu.replicas=2"])
    with pytest.raises(ConfigError, match="cpu.gradient_accumulation 3 does not divide train.global_batch_size 2176"):
        load_recipe("vit-b16-ft", ["cpu.gradient_accumulation=3"])
    assert batch_split(2176, 136, 4)[1] == 4
    with pytest.raises(ConfigError, match=r"global_batch_size 2176 is not divisible by the world size 3"):
        batch_split(2176, 136, 3)
    with pytest.raises(ConfigError, match=r"2176 / world size 4 = 544 .*gradient_accumulation 2 splits into "
                                          r"micro-batches of 272 > cpu.micro_batch_size 136"):
        batch_split(2176, 136, 4, requested=2)


@pytest.mark.parametrize("global_batch,micro,world,expect", [
    (64, 64, 2, (32, 1)),        # the README's ZeRO example: micro-batch shrinks to the share
    (64, 64, 1, (64, 1)),
    (2176, 136, 16, (136, 1)),   # vit-b16-ft on 16 GPUs
    (2176, 136, 4, (136, 4)),
    (2176, 100, 1, (68, 32)),    # 100 is an upper bound: the largest divisor of 2176 below it
    (64, 24, 2, (16, 2)),
    (66, 64, 3, (22, 1)),
    (21, 4, 3, (1, 7)),          # a prime share: micro-batch 1, accumulation fills the rest
])
def test_batch_split_reaches_the_global_batch_on_any_world_size(global_batch, micro, world, expect):
    from vit_accel.config import batch_split

    got = batch_split(global_batch, micro, world)
    assert got == expect
    assert got[0] <= micro and got[0] * got[1] * world == global_batch


def test_batch_split_with_a_requested_accumulation():
    from vit_accel.config import batch_split

    assert batch_split(64, 64, 2, requested=4) == (8, 4)
    with pytest.raises(ConfigError, match=r"64 / world size 2 = 32 per process, which gpu.gradient_accumulation 3 "
                                          r"does not divide; set gpu.gradient_accumulation=0"):
        batch_split(64, 64, 2, requested=3, section="gpu")
    # a micro-batch that does not divide the global batch loads: it is an upper bound
    assert load_recipe("vit-b16-ft", ["cpu.micro_batch_size=100"]).cpu.micro_batch_size == 100


def test_missing_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known recipes: .*vit-b16-ft"):
        load_recipe("vit-b16-typo")


def test_schedule_values_at_known_iterations():
    r = load_recipe("vit-b16-ft")  # mmcv: a cosine over all 5,000 steps, warm-up multiplying it
    lr = r.optim.lr
    cos = lambda s: 0.5 * (1 + math.cos(math.pi * s / 5000))  # noqa: E731
    assert lr_at(0, r.schedule, lr) == pytest.approx(0.02 * lr)
    assert lr_at(400, r.schedule, lr) == pytest.approx(lr * cos(400) * (0.02 + 0.98 * 0.5))
    assert lr_at(800, r.schedule, lr) == pytest.approx(lr * cos(800))
    assert lr_at(2500, r.schedule, lr) == pytest.approx(lr * 0.5)
    assert lr_at(5000, r.schedule, lr) == pytest.approx(0.0, abs=1e-12)
    vals = [lr_at(s, r.schedule, lr) for s in range(0, 5001, 50)]
    assert all(b >= a for a, b in zip(vals[:17], vals[1:17]))  # warm-up rises
    assert all(b <= a + 1e-15 for a, b in zip(vals[16:], vals[17:]))  # cosine falls
    assert not any(math.isnan(v) for v in vals)


def test_no_weight_decay_on_cls_token_and_pos_embed():
    r = load_recipe("vit-b16-ft")
    model = create_vit("vit-ti16", img_size=32, patch_size=8, depth=1, num_classes=3)
    groups = param_groups(model, r.optim)
    ids = {id(p): n for n, p in model.named_parameters()}
    no_decay = {ids[id(p)] for p in groups[1]["params"]}
    assert no_decay == {"cls_token", "pos_embed"} and groups[1]["weight_decay"] == 0.0
    assert groups[0]["weight_decay"] == 1e-5
    opt = build_optimizer(model, r.optim)
    assert isinstance(opt, __import__("torch").optim.SGD) and opt.defaults["momentum"] == 0.9


# every ModelConfig setting that is also a ViTConfig field, at a value other than its default
MODEL_SETTINGS = {"img_size": 64, "patch_size": 8, "depth": 2, "num_classes": 7, "drop_rate": 0.1,
                  "attn_drop_rate": 0.1, "drop_path_rate": 0.1, "representation_size": 32,
                  "global_pool": "avg", "fc_norm": True, "layer_norm_eps": 1e-5, "gelu_approximate": "tanh",
                  "pos_embed_std": 0.5}


def test_every_model_setting_reaches_the_model():
    from dataclasses import fields

    from vit_accel.config import ModelConfig, vit_options
    from vit_accel.model import ViTConfig

    shared = ({f.name for f in fields(ModelConfig)} & {f.name for f in fields(ViTConfig)}) - {"name"}  # the variant
    assert shared == set(MODEL_SETTINGS), "update MODEL_SETTINGS with the new setting"
    recipe = load_recipe("vit-ti-digits", ["model.%s=%s" % kv for kv in MODEL_SETTINGS.items()])
    cfg = create_vit(recipe.model.name, **vit_options(recipe.model)).cfg
    assert {k: getattr(cfg, k) for k in MODEL_SETTINGS} == MODEL_SETTINGS
