"""Every training recipe runs end to end on the CPU at toy scale: the bundled digits, a tiny model
through --set, a few steps of the recipe's own optimizer, schedule and augmentations, with EMA
and layer-wise lr decay on."""
import json
from pathlib import Path

import pytest
import torch

from vit_accel.cli import main
from vit_accel.config import load_recipe
from vit_accel.engine.plan import schedule_plan

TRAINING_RECIPES = ["vit-b16-ft", "vit-b16-scratch",
                    "vit-b32-classy", "vit-b16-classy", "vit-l32-classy", "vit-l16-classy",
                    "vit-b32-classy-ft-384", "vit-b16-classy-ft-384", "vit-l32-classy-ft-384", "vit-l16-classy-ft-384"]
DIGITS_TRAIN = 1437


def test_every_training_row_of_table_b_has_a_recipe():
    rows = {load_recipe(n).reproduces.name for n in TRAINING_RECIPES}
    assert rows == {"configs/vision_transformer/vit-base-p16_ft-4xb544-ipu_in1k.py",
                    "configs/vision_transformer/vit-base-p16_32xb128-mae_in1k.py"} | {
        f"examples/vit/{j}.json" for j in ("vit_b32_in", "vit_b16_in", "vit_l_32_in", "vit_l16_in", "vit_b32_in_ft",
                                           "vit_b16_in_ft", "vit_l32_in_ft", "vit_l16_in_ft")}
    for n in TRAINING_RECIPES:
        r = load_recipe(n)
        assert r.reproduces.top1 and r.reproduces.source in ("mmcls", "mmpretrain", "classyvision")
        text = (Path(__file__).resolve().parent.parent / "configs" / f"{n}.yaml").read_text()
        assert "Deliberate differences from the source" in text, n


def _layer(name, depth):
    """mmpretrain's get_layer_depth / MAE numbering: embeddings 0, block i i + 1, the rest depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1


def _record_group_rates(monkeypatch):
    """Each step's optimizer groups as the backend leaves them before the update: (lr, weight decay, names)."""
    from vit_accel.backends import cpu as cpu_mod
    from vit_accel.engine import trainer

    models, steps = [], []
    real_build, real_set_lr = trainer.build_model, cpu_mod.set_lr

    def build_model(*args, **kwargs):
        models.append(real_build(*args, **kwargs))
        return models[-1]

    def set_lr(optimizer, lr):
        real_set_lr(optimizer, lr)
        names = {id(p): n for n, p in models[-1].named_parameters()}
        steps.append([(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups])

    monkeypatch.setattr(trainer, "build_model", build_model)
    monkeypatch.setattr(cpu_mod, "set_lr", set_lr)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_recipe_runs_at_toy_scale_with_ema_and_layer_decay(name, tmp_path, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path_factory.getbasetemp() / "digits")
    toy = [f"data.root={root}", "data.source=digits", "model.name=vit-ti16", "model.depth=1", "model.img_size=32",
           "model.patch_size=8", "model.num_classes=10", "model.pretrained=", "data.eval_resize=32",
           "train.global_batch_size=32", "cpu.micro_batch_size=16", "data.workers=0", "train.eval_every=0",
           "train.checkpoint_every=2", "train.log_every=1", "train.ema_momentum=0.5", "optim.layer_decay=0.75"]
    if load_recipe(name).model.representation_size:
        toy.append("model.representation_size=16")     # the recipe's pre-logits head, narrow
    sets = [a for kv in toy for a in ("--set", kv)]
    groups = _record_group_rates(monkeypatch)
    rd = tmp_path / "run"
    args = ["train", "--config", name, "--backend", "cpu", "--no-progress", "--run-dir", str(rd), "--stop-after", "3"]
    assert main(args + sets) == 0
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["ema_val_top1"] <= 1 and summary["ema_val_count"] == 360
    ck = torch.load(rd / "checkpoints" / "step_0000002.pt", map_location="cpu", weights_only=False)
    assert ck["ema"]["steps"] == 2 and ck["ema"]["params"].keys() == {
        k for k in ck["model"] if not k.endswith("num_batches_tracked")}
    # The optimizer's rates at every step: the recipe's schedule as `vit-accel plan` gives it (checked against
    # the source's own code in test_schedule_sources.py), its epochs counted in digits' samples, times each
    # parameter's layer-wise decay; its weight decay as the recipe exempts.
    recipe = load_recipe(name, toy, backends=["cpu"])
    plan = schedule_plan(recipe, 1, DIGITS_TRAIN, "cpu")["lr"]     # what `vit-accel plan --json` shows
    optim = recipe.optim
    assert len(groups) == 3
    scales = set()
    for step, step_groups in enumerate(groups):
        for lr, weight_decay, names in step_groups:
            for n in names:
                scale = 0.75 ** (1 + 1 - _layer(n, depth=1))
                scales.add(round(scale, 6))
                assert lr == pytest.approx(plan[step] * scale, rel=1e-12, abs=1e-18), (step, n)
                ndim = ck["model"][n].ndim
                exempt = n in optim.no_decay or (optim.no_decay_1d and ndim <= 1)
                assert weight_decay == (0.0 if exempt else optim.weight_decay), n
    assert scales == {round(0.75 ** k, 6) for k in range(3)}
    logged = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if r["kind"] == "train"] == pytest.approx(plan[:3], rel=1e-12, abs=1e-18)
    if name == "vit-b16-scratch":   # the checkpoint's EMA evaluates as the run evaluated it
        capsys.readouterr()
        evaluate = ["eval", "--config", name, "--backend", "cpu", "--checkpoint",
                    str(rd / "checkpoints" / "step_0000003.pt"), "--json"] + sets
        assert main(evaluate + ["--ema"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["val_loss"] == pytest.approx(summary["ema_val_loss"], rel=1e-6)
        assert res["val_top1"] == summary["ema_val_top1"]
        assert main(evaluate) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
