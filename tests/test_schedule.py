"""Learning-rate schedules against independent implementations of each source's formula.

mmcv 1.x: an emulation of ``LrUpdaterHook.before_train_iter`` + ``CosineAnnealingLrUpdaterHook``.
mmengine: torch's own chainable ``LinearLR`` / ``CosineAnnealingLR`` (mmengine's schedulers are
written after them, same recursions), stepped with mmengine's begin/end rules.
ClassyVision: an emulation of fvcore's ``CompositeParamScheduler`` / ``LinearParamScheduler`` /
``CosineParamScheduler`` and of ``ClassificationTask.where``.
"""
import math

import pytest
import torch

from vit_accel.config import ConfigError, ScheduleConfig, load_recipe
from vit_accel.engine.schedule import SCHEDULES, build_schedule, lr_at, steps_per_epoch

IMAGENET = 1_281_167


# ---------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------

def mmcv_rates(base_lr, min_lr, max_iters, warmup_iters, warmup_ratio):
    """mmcv 1.x, by_epoch=False: before each iteration set regular lr, or the warm-up lr."""
    def annealing_cos(start, end, factor, weight=1.0):
        cos_out = math.cos(math.pi * factor) + 1
        return end + 0.5 * weight * (start - end) * cos_out

    out = []
    for it in range(max_iters):
        regular = annealing_cos(base_lr, min_lr, it / max_iters)
        if it >= warmup_iters:
            out.append(regular)
        else:
            k = (1 - it / warmup_iters) * (1 - warmup_ratio)
            out.append(regular * (1 - k))
    return out


def mmengine_rates(base_lr, start_factor, eta_min, warmup_epochs, max_epochs, epoch_len):
    """mmengine's two schedulers as torch's chainable schedulers, stepped as mmengine's hook does:
    LinearLR after every iteration of [0, warmup_epochs x len), CosineAnnealingLR after every
    epoch from warmup_epochs on (T_max = max_epochs - warmup_epochs)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    end = int(warmup_epochs * epoch_len)
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=start_factor, end_factor=1.0, total_iters=end - 1)
    cosine = None
    opt.step()                       # before any scheduler step, as torch asks (p has no gradient)
    out = []
    for epoch in range(max_epochs):
        if epoch == warmup_epochs:   # its first step in range returns the value it finds (last_step 0)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs - warmup_epochs,
                                                                eta_min=eta_min)
        for i in range(epoch_len):
            out.append(opt.param_groups[0]["lr"])
            if epoch * epoch_len + i + 1 < end:
                linear.step()
        if cosine is not None and epoch + 1 < max_epochs:
            cosine.step()
    return out


class _Linear:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def __call__(self, where):
        return self.end * where + self.start * (1 - where)


class _Cosine:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def __call__(self, where):
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * where))


def classy_composite(schedulers, lengths, scaling, where):
    i, running = 0, lengths[0]
    while where + 1e-6 > running and i < len(schedulers) - 1:
        i += 1
        running += lengths[i]
    w = where
    if scaling[i] == "rescaled":
        w = (where - (running - lengths[i])) / lengths[i]
    return schedulers[i](w)


def classy_rates(scheduler, num_epochs, batches_per_phase, optimizer_period=1):
    """ClassificationTask: where = forward passes so far / all, at each optimizer step."""
    total = num_epochs * batches_per_phase
    return [scheduler(u / total) for u in range(total) if u % optimizer_period == optimizer_period - 1]


def _cfg(**kw):
    base = dict(total_steps=0, warmup_steps=0)
    base.update(kw)
    return ScheduleConfig(**base)


# ---------------------------------------------------------------------------------------
# Each schedule, every step of a short run and the boundaries of a full one
# ---------------------------------------------------------------------------------------

def test_mmcv_cosine_every_step():
    cfg = _cfg(kind="mmcv_cosine", total_steps=50, warmup_steps=8, warmup_start_factor=0.02)
    ours = build_schedule(cfg, 0.08, 2176).lrs()
    assert ours == pytest.approx(mmcv_rates(0.08, 0.0, 50, 8, 0.02), rel=1e-13, abs=1e-16)


def test_mmcv_cosine_full_run_is_the_ipu_recipe():
    r = load_recipe("vit-b16-ft")
    assert r.schedule.kind == "mmcv_cosine"
    sched = build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size)
    ref = mmcv_rates(0.08, 0.0, 5000, 800, 0.02)
    ours = sched.lrs()
    assert len(ours) == sched.total_steps == 5000
    assert ours == pytest.approx(ref, rel=1e-13, abs=1e-16)
    for step in (0, 799, 800, 4999):  # first, last of warm-up, first after, last
        assert sched.lr(step) == pytest.approx(ref[step], rel=1e-14)
    assert sched.lr(0) == pytest.approx(0.08 * 0.02)                      # warmup_ratio x lr
    assert sched.lr(800) == pytest.approx(0.08 * 0.5 * (1 + math.cos(math.pi * 0.16)))  # no restart
    # the previous schedule (cosine restarted after warm-up) ran above mmcv's by these factors
    old = ScheduleConfig(kind="cosine", total_steps=5000, warmup_steps=800, warmup_start_factor=0.02)
    ratio = {s: lr_at(s, old, 0.08) / sched.lr(s) for s in (800, 2900, 4500)}
    assert [round(ratio[s], 2) for s in (800, 2900, 4500)] == [1.07, 1.33, 1.41]


def test_mmengine_linear_cosine_every_step():
    cfg = _cfg(kind="mmengine_linear_cosine", epochs=6, warmup_epochs=2, warmup_start_factor=1e-3, min_lr=1e-5)
    sched = build_schedule(cfg, 1.6e-3, 32, train_samples=7 * 32 - 5)   # 7 steps per epoch, last one short
    assert sched.steps_per_epoch == 7 and sched.total_steps == 42 and sched.warmup_steps == 14
    assert sched.lrs() == pytest.approx(mmengine_rates(1.6e-3, 1e-3, 1e-5, 2, 6, 7), rel=1e-12)


def test_mmengine_linear_cosine_full_run_is_the_mmpretrain_recipe():
    r = load_recipe("vit-b16-scratch")
    sched = build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size, train_samples=IMAGENET)
    assert r.optim.lr == pytest.approx(1e-4 * 4096 / 256)
    assert sched.steps_per_epoch == 313 and sched.total_steps == 300 * 313 and sched.warmup_steps == 20 * 313
    ref = mmengine_rates(r.optim.lr, 1e-3, 1e-5, 20, 300, 313)
    ours = sched.lrs()
    assert ours == pytest.approx(ref, rel=1e-11)
    for step in (0, 6259, 6260, 6260 + 312, 6260 + 313, 93_899):
        assert ours[step] == pytest.approx(ref[step], rel=1e-11)
    assert ours[0] == pytest.approx(1.6e-6) and ours[6259] == pytest.approx(1.6e-3)
    assert ours[6260] == ours[6260 + 312] == pytest.approx(1.6e-3)       # the cosine changes once per epoch
    assert ours[-1] == pytest.approx(1e-5 + (1.6e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 279 / 280)))


def test_classy_composite_every_step_and_full_run():
    sched_ref = lambda lr: lambda w: classy_composite(  # noqa: E731
        [_Linear(0, lr), _Cosine(lr, 0)], [0.1, 0.9], ["rescaled", "fixed"], w)
    cfg = _cfg(kind="classy_composite", epochs=5, warmup_fraction=0.1, warmup_start_factor=0.0)
    short = build_schedule(cfg, 0.003, 64, train_samples=640)
    assert short.total_steps == 50
    assert short.lrs() == pytest.approx(classy_rates(sched_ref(0.003), 5, 10), rel=1e-13, abs=1e-18)

    r = load_recipe("vit-b16-classy")
    full = build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size, train_samples=IMAGENET)
    ref = classy_rates(sched_ref(0.003), 300, 313)
    ours = full.lrs()
    assert len(ours) == len(ref) == 93_900
    assert ours == pytest.approx(ref, rel=1e-13, abs=1e-18)
    switch = full.warmup_steps
    assert switch == 9390 and ours[0] == 0.0
    assert ours[switch - 1] == pytest.approx(0.003 * (switch - 1) / 9390)
    # after the switch the cosine is the fixed one at the overall where: no restart at the peak
    assert ours[switch] == pytest.approx(0.003 * 0.5 * (1 + math.cos(0.1 * math.pi)))
    assert ours[-1] == pytest.approx(ref[-1]) and ours[-1] < 1e-9


def test_classy_where_with_accumulation_differs_by_less_than_one_step():
    # ClassyVision samples where at the last forward pass of each accumulation period
    cos = _Cosine(0.01, 0.0)
    ours = build_schedule(_cfg(kind="classy_cosine", epochs=8), 0.01, 512, train_samples=512 * 40).lrs()
    assert ours == pytest.approx(classy_rates(cos, 8, 40), rel=1e-13, abs=1e-18)   # no accumulation: equal
    with_accum = classy_rates(cos, 8, 40 * 4, optimizer_period=4)
    assert len(with_accum) == len(ours)
    worst = max(abs(a - b) for a, b in zip(ours, with_accum))
    assert 0 < worst <= 0.01 * math.pi / 320                                        # < one step's slope


def test_classy_cosine_is_the_fine_tuning_recipe():
    r = load_recipe("vit-b16-classy-ft-384")
    sched = build_schedule(r.schedule, r.optim.lr, r.train.global_batch_size, train_samples=IMAGENET)
    assert sched.steps_per_epoch == steps_per_epoch(IMAGENET, 512) == 2503 and sched.total_steps == 8 * 2503
    ref = classy_rates(_Cosine(0.01, 0.0), 8, 2503)
    assert sched.lr(0) == 0.01 and sched.lrs() == pytest.approx(ref, rel=1e-13, abs=1e-18)


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
