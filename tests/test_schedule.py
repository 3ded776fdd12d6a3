"""Learning-rate schedules: the landmarks each source's formula fixes, bad input, `vit-accel plan`.

Every recipe's rate at every step is checked against the sources' own runners and schedulers
(mmcv, mmengine, ClassyVision) in tests/test_schedule_sources.py.
"""
import math

import pytest

from vit_accel.config import ConfigError, ScheduleConfig, load_recipe
from vit_accel.config import SCHEDULES
from vit_accel.engine.schedule import build_schedule, lr_at, steps_per_epoch

IMAGENET = 1_281_167


def _cfg(**kw):
    base = dict(total_steps=0, warmup_steps=0)
    base.update(kw)
    return ScheduleConfig(**base)


# ---------------------------------------------------------------------------------------
# Landmarks of each schedule at the recipes' lengths
# ---------------------------------------------------------------------------------------

def test_mmcv_cosine_multiplies_the_unrestarted_cosine_during_warm_up():
    r = load_recipe("vit-b16-ft")
    sched = build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size)
    assert (sched.kind, sched.total_steps, sched.warmup_steps) == ("mmcv_cosine", 5000, 800)
    assert sched.lr(0) == pytest.approx(0.08 * 0.02)                      # warmup_ratio x lr
    cos = lambda s: 0.08 * 0.5 * (1 + math.cos(math.pi * s / 5000))  # noqa: E731
    assert sched.lr(400) == pytest.approx(cos(400) * (1 - 0.5 * 0.98))
    assert sched.lr(800) == pytest.approx(cos(800))                      # no restart at the peak
    # the previous schedule (cosine restarted after warm-up) ran above mmcv's by these factors
    old = ScheduleConfig(kind="cosine", total_steps=5000, warmup_steps=800, warmup_start_factor=0.02)
    ratio = {s: lr_at(s, old, 0.08) / sched.lr(s) for s in (800, 2900, 4500)}
    assert [round(ratio[s], 2) for s in (800, 2900, 4500)] == [1.07, 1.33, 1.41]


def test_mmengine_linear_cosine_changes_per_iteration_then_per_epoch():
    r = load_recipe("vit-b16-scratch")
    sched = build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size, train_samples=IMAGENET)
    assert r.optim.lr == pytest.approx(1e-4 * 4096 / 256)
    assert sched.steps_per_epoch == 313 and sched.total_steps == 300 * 313 and sched.warmup_steps == 20 * 313
    ours = sched.lrs()
    assert ours[0] == pytest.approx(1.6e-6) and ours[6259] == pytest.approx(1.6e-3)
    assert ours[6260] == ours[6260 + 312] == pytest.approx(1.6e-3)       # the cosine changes once per epoch
    assert ours[-1] == pytest.approx(1e-5 + (1.6e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 279 / 280)))


def test_classy_composite_switches_to_the_fixed_cosine_without_restart():
    r = load_recipe("vit-b16-classy")
    full = build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size, train_samples=IMAGENET)
    ours = full.lrs()
    switch = full.warmup_steps
    assert len(ours) == 93_900 and switch == 9390 and ours[0] == 0.0
    assert ours[switch - 1] == pytest.approx(0.003 * (switch - 1) / 9390)
    assert ours[switch] == pytest.approx(0.003 * 0.5 * (1 + math.cos(0.1 * math.pi)))
    assert 0 < ours[-1] < 1e-9


def test_classy_cosine_is_the_fine_tuning_recipe():
    r = load_recipe("vit-b16-classy-ft-384")
    sched = build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size, train_samples=IMAGENET)
    assert sched.steps_per_epoch == steps_per_epoch(IMAGENET, 512) == 2503 and sched.total_steps == 8 * 2503
    assert sched.lr(0) == 0.01 and sched.lr(sched.total_steps // 2) == pytest.approx(0.005)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="schedule.kind: 'cosin' is not one of cosine, constant, mmcv_cosine"):
        load_recipe("vit-ti-digits", ["schedule.kind=cosin"])
    assert set(SCHEDULES) == {"cosine", "constant", "mmcv_cosine", "mmengine_linear_cosine", "classy_composite",
                              "classy_cosine"}


@pytest.mark.parametrize("overrides, message", [
    (["schedule.epochs=300"], "give the run's length once.*total_steps 600 and epochs 300"),
    (["schedule.warmup_epochs=2"], "give the warm-up once; got warmup_steps 30 and warmup_epochs 2"),
    (["schedule.warmup_steps=600"], "warmup_steps 600 >= total_steps 600"),
    (["schedule.kind=mmengine_linear_cosine"], "counts whole epochs"),
    (["schedule.kind=classy_composite"], "needs schedule.warmup_fraction"),
])
def test_bad_lengths_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("vit-ti-digits", overrides)


def test_warm_up_longer_than_the_data_allows_shows_the_arithmetic():
    r = load_recipe("vit-b16-scratch", ["schedule.epochs=2", "schedule.warmup_epochs=2"])
    with pytest.raises(ConfigError, match=r"warmup_epochs 2 x 1 = 2 steps\) does not fit in the run \(epochs 2 x 1 = "
                                          r"2 steps\); steps per epoch = ceil\(train samples 1,437 / global batch "
                                          r"4,096\) = 1"):
        build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size, train_samples=1437)
    with pytest.raises(ConfigError, match="need the number of training samples.*--train-samples"):
        build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size)


# ---------------------------------------------------------------------------------------
# vit-accel plan
# ---------------------------------------------------------------------------------------

def test_plan_shows_batch_arithmetic_steps_and_the_rate_at_every_step(tmp_path, capsys):
    import json

    from vit_accel.cli import main

    png = tmp_path / "lr.png"
    assert main(["plan", "--backend", "gpu", "--config", "vit-b16-scratch", "--world-size", "8",
                 "--train-samples", str(IMAGENET), "--json", "--lr-plot", str(png)]) == 0
    s = json.loads(capsys.readouterr().out)["schedule"]
    assert s["batch"]["text"] == "micro-batch 128 x accumulation 4 x world size 8 = global batch 4,096"
    assert (s["optimizer_steps"], s["steps_per_epoch"], s["warmup_steps"], s["train_samples"]) == (
        93_900, 313, 6260, IMAGENET)
    r = load_recipe("vit-b16-scratch")
    assert s["lr"] == build_schedule(r.schedule, r.optim.lr, 4096, IMAGENET).lrs()
    assert png.stat().st_size > 10_000

    assert main(["plan", "--backend", "gpu", "--config", "vit-b16-ft", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "schedule: mmcv_cosine: 5,000 optimizer steps, warm-up 800 steps, lr 0.08" in out
    assert "micro-batch 136 x accumulation 4 x world size 4 = global batch 2,176" in out

    # the micro-batch is an upper bound: 2,176 on 32 GPUs is 68 per GPU, one micro-batch of 68
    assert main(["plan", "--backend", "gpu", "--config", "vit-b16-ft", "--world-size", "32"]) == 0
    assert "micro-batch 68 x accumulation 1 x world size 32 = global batch 2,176" in capsys.readouterr().out
    assert main(["plan", "--backend", "gpu", "--config", "vit-b16-ft", "--world-size", "3"]) == 2
    assert "global_batch_size 2176 is not divisible by the world size 3" in capsys.readouterr().err
    # lengths in epochs and no shards: the plan still shows the rest and says what it needs
    assert main(["plan", "--backend", "gpu", "--config", "vit-b16-classy", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["schedule"]
    assert s["lr"] is None and s["optimizer_steps"] is None and "--train-samples" in s["unresolved"]
    assert main(["plan", "--backend", "gpu", "--config", "vit-b16-classy", "--lr-plot", str(png)]) == 2
    assert "--train-samples" in capsys.readouterr().err
