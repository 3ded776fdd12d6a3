"""Stage plans: building, validation, estimates, auto split, the CPU emulation, `vit-accel plan`."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from vit_accel.config import ConfigError, load_recipe
from vit_accel.backends import pipeline as pl
from vit_accel.backends import pipeline_cost as cost
from vit_accel.backends import stages
from vit_accel.backends.pipeline_report import plan_report
from vit_accel.backends.pipeline_run import emulate_pipeline_step, stage_modules
from vit_accel.model import count_macs, create_vit, vit_config


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(depth=4, **kw):
    kw.setdefault("num_classes", 5)
    return create_vit("vit-ti16", img_size=16, patch_size=8, depth=depth, attn_impl="eager", **kw)


def test_vit_b16_ft_plan_is_the_mmcls_split():
    plan = pl.build_plan(load_recipe("vit-b16-ft"))
    assert plan.starts == ["patch_embed", "blocks.3", "blocks.6", "blocks.9"]
    assert [s.ipu for s in plan.stages] == [0, 1, 2, 3]
    assert [s.blocks for s in plan.stages] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert [(s.patch_embed, s.norm, s.head) for s in plan.stages] == [
        (True, False, False), (False, False, False), (False, False, False), (False, True, True)]
    assert plan.recompute == list(range(12))
    assert plan.stage_of_param("pos_embed").index == 0 and plan.stage_of_param("head.weight").index == 3
    assert plan.stage_of_param("blocks.7.mlp.fc1.weight").index == 2


def test_layers_per_ipu_and_implicit_first_stage_give_the_same_plan():
    a = pl.plan_from_starts(["patch_embed", "blocks.3", "blocks.6", "blocks.9"], 12, 4)
    b = pl.plan_from_layers([3, 3, 3, 3], 12, 4)
    c = pl.plan_from_starts(["blocks.3", "blocks.6", "blocks.9"], 12, 4)  # patch_embed runs on IPU 0 anyway
    assert a.stages == b.stages == c.stages
    d = pl.plan_from_starts(["patch_embed", "blocks.6", "norm"], 12, 3)
    assert d.stages[2].blocks == [] and d.stages[2].norm and d.stages[1].blocks == list(range(6, 12))
    assert pl.plan_from_starts(["patch_embed"], 12, 1, recompute="none").recompute == []


@pytest.mark.parametrize("overrides, message", [
    (["ipu.splits=[patch_embed, blocks.3, blocks.60, blocks.9]"], "unknown module 'blocks.60'; valid stage starts"),
    (["ipu.splits=[patch_embed, blocks.6, blocks.3, blocks.9]"], "stages out of order: 'blocks.3' does not come after"),
    (["ipu.splits=[patch_embed, blocks.2, blocks.4, blocks.6, blocks.9]"], "5 stages"),
    (["ipu.splits=[patch_embed, blocks.6]"], "set ipu.ipus_per_replica=2"),
    (["ipu.layers_per_ipu=[3, 3, 3, 2]"], "adds up to 11 blocks but the model has depth 12"),
    (["ipu.layers_per_ipu=[4, 0, 4, 4]"], "only the first and last stage may hold 0 blocks"),
    (["ipu.gradient_accumulation=4", "train.global_batch_size=272", "cpu.micro_batch_size=17",
      "gpu.micro_batch_size=17"], "gradient_accumulation 4 is below 7"),
    (["ipu.recompute=sometimes"], "ipu.recompute"),
])
def test_bad_plans_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        pl.build_plan(load_recipe("vit-b16-ft", overrides))


def test_unknown_module_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        pl.plan_from_starts(["patch_embed", "encoder.3"], 4, 2)
    assert "patch_embed, blocks.0, blocks.1, blocks.2, blocks.3, norm, head" in str(e.value)


def test_analytic_counts_match_the_model():
    for cfg_kw in (dict(), dict(representation_size=24, qkv_bias=False), dict(num_classes=0)):
        m = tiny(**cfg_kw)
        by = cost.module_params(m.cfg)
        assert sum(by.values()) == m.num_params()
        for name in ("patch_embed", "blocks.1", "norm", "head"):
            own = sum(p.numel() for k, p in m.named_parameters() if stages.module_of_param(k) == name)
            assert own == by[name], name
        assert sum(cost.module_macs(m.cfg).values()) == count_macs(m.cfg)
    assert sum(cost.module_params(vit_config("vit-b16")).values()) == 86_567_656   # timm's count


def _all_splits(cfg, n, cm):
    for cuts in itertools.combinations(range(1, cfg.depth), n - 1):
        b = (0,) + cuts + (cfg.depth,)
        layers = [y - x for x, y in zip(b, b[1:])]
        plan = pl.plan_from_layers(layers, cfg.depth, n)
        ests = cost.estimate_plan(plan, cfg, cm)
        yield layers, ests


def test_auto_split_minimizes_the_worst_stage():
    cfg = vit_config("vit-s16", depth=9)
    cm = cost.CostModel(micro_batch=32)
    auto = pl.auto_plan(cfg, 3, cm)
    assert auto.source == "auto" and sum(auto.layers_per_stage) == 9

    def worst(ests, ref_mem, ref_flops):
        return max(max(e.total_bytes / ref_mem, e.gflop_per_micro_batch / ref_flops) for e in ests)

    even = cost.estimate_plan(pl.plan_from_layers([3, 3, 3], 9, 3), cfg, cm)
    ref_mem = sum(e.total_bytes for e in even) / 3
    ref_flops = sum(e.gflop_per_micro_batch for e in even) / 3
    got = worst(cost.estimate_plan(auto, cfg, cm), ref_mem, ref_flops)
    best = min(worst(ests, ref_mem, ref_flops) for _, ests in _all_splits(cfg, 3, cm))
    assert got == pytest.approx(best)
    # memory pressure (many in-flight stashes on the first stage) moves blocks off it
    heavy = pl.auto_plan(cfg, 3, cost.CostModel(micro_batch=512, recompute=False))
    assert heavy.layers_per_stage[0] < heavy.layers_per_stage[-1]


def test_auto_split_recipes():
    assert pl.build_plan(load_recipe("vit-b16-ft", ["ipu.auto_split=true"])).layers_per_stage == [3, 3, 3, 3]
    for n in (4, 8):
        r = load_recipe("vit-b16-ft", ["model.name=vit-l16", "ipu.auto_split=true", f"ipu.ipus_per_replica={n}"])
        rep = plan_report(r)
        assert sum(pl.build_plan(r).layers_per_stage) == 24 and len(rep["estimates"]) == n
        assert rep["imbalance"]["memory"] >= 1.0 and rep["batch"]["ipus_total"] == 4 * n
    with pytest.raises(ConfigError, match="auto split: 16 devices for 12 blocks"):
        pl.build_plan(load_recipe("vit-b16-ft", ["ipu.auto_split=true", "ipu.ipus_per_replica=16"]))


def test_memory_estimate_follows_the_recipe():
    r = load_recipe("vit-b16-ft")
    base = plan_report(r)["estimates"]
    # 3 blocks of fp16 weights, fp16 accumulator and fp16 velocity on a middle IPU
    assert base[1]["weights_bytes"] == 3 * cost.module_params(pl.model_config(r))["blocks.0"] * 2
    assert base[1]["optimizer_bytes"] == 2 * base[1]["weights_bytes"]
    assert base[0]["activation_bytes"] > base[3]["activation_bytes"]      # 7 vs 1 micro-batches in flight
    fp32 = plan_report(load_recipe("vit-b16-ft", ["ipu.velocity_accum_type=float"]))["estimates"]
    assert fp32[1]["optimizer_bytes"] == base[1]["optimizer_bytes"] * 3 // 2
    off = plan_report(load_recipe("vit-b16-ft", ["ipu.optimizer_location=off_chip"]))["estimates"]
    assert off[1]["optimizer_bytes"] == base[1]["optimizer_bytes"] // 2     # only the accumulator stays
    no_rc = plan_report(load_recipe("vit-b16-ft", ["ipu.recompute=none"]))["estimates"]
    assert no_rc[0]["activation_bytes"] > 3 * base[0]["activation_bytes"]
    assert no_rc[0]["gflop_per_micro_batch"] == pytest.approx(base[0]["gflop_per_micro_batch"] * 3 / 4)


def test_stages_in_order_are_the_model():
    m = tiny(depth=5).eval()
    plan = pl.plan_from_starts(["patch_embed", "blocks.2", "norm"], 5, 3)
    x = torch.randn(3, 3, 16, 16)
    h = x
    for st in stage_modules(m, plan):
        h = st(h)
    torch.testing.assert_close(h, m(x), rtol=0, atol=0)


@pytest.mark.parametrize("starts", [["patch_embed", "blocks.2"], ["patch_embed", "blocks.1", "blocks.3", "head"]])
def test_emulated_pipeline_step_equals_a_plain_step(starts):
    torch.manual_seed(0)
    a = tiny(depth=4)
    torch.nn.init.normal_(a.head.weight, std=0.1)    # a zero head would give zero grads upstream
    b = create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5, attn_impl="eager")
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 5, (12,))
    plan = pl.plan_from_starts(starts, 4, len(starts))
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)

    before = a.blocks[0].attn.qkv.weight.detach().clone()
    losses = emulate_pipeline_step(a, plan, x, y, micro_batch=3, loss_fn=F.cross_entropy)
    opt_a.step()
    loss = F.cross_entropy(b(x), y)
    loss.backward()
    opt_b.step()

    assert losses.shape == (4,)
    assert (a.blocks[0].attn.qkv.weight - before).abs().max() > 1e-4      # the step did move the weights
    assert float(losses.mean()) == pytest.approx(loss.item(), abs=1e-6)
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.grad is not None, k
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=k)


def test_plan_command(capsys):
    from vit_accel.cli import main

    assert main(["plan", "--backend", "ipu", "--config", "vit-b16-ft"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 17 x accumulation 32 x replicas 4 = 2,176 images per optimizer step" in out
    assert "replicas 4 x ipus_per_replica 4 = 16 IPUs total" in out
    assert "12 checkpoints" in out and "imbalance (max/mean)" in out
    for start in ("patch_embed", "blocks.3", "blocks.6", "blocks.9"):
        assert start in out
    assert main(["plan", "--config", "vit-b16-ft", "--json", "--set", "model.name=vit-l16",
                 "--set", "ipu.auto_split=true", "--set", "ipu.ipus_per_replica=8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["plan"]["source"] == "auto" and len(rep["plan"]["stages"]) == 8
    assert main(["plan", "--backend", "gpu", "--config", "vit-ti-digits"]) == 0
    assert "schedule gpipe; 2 ranks" in capsys.readouterr().out
    assert main(["plan", "--config", "vit-b16-ft", "--set", "ipu.splits=[patch_embed, blocks.99]"]) == 2
    assert "unknown module 'blocks.99'" in capsys.readouterr().err
