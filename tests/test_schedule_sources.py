"""Every training recipe's learning rate against its source's own code, over whole runs.

The sources' libraries run as their users ran them, with a model whose step does nothing but let
the optimizer step, and the rate of every optimizer update is recorded:

* mmcls 0.x's IPU recipe: mmcv 1.7.2 ``IterBasedRunner`` with the ``lr_config`` of
  ``configs/vision_transformer/vit-base-p16_ft-4xb544-ipu_in1k.py`` given to
  ``register_training_hooks`` (its ``CosineAnnealingLrUpdaterHook``);
* mmpretrain 1.x: mmengine 0.10.7 ``Runner.train()`` (``EpochBasedTrainLoop``, ``ParamSchedulerHook``)
  with ``_base_/schedules/imagenet_bs1024_adamw_swin.py``'s ``param_scheduler``, the epoch length from
  a real ``DefaultSampler`` + ``DataLoader`` at the world size;
* ClassyVision 0.7.0: a ``ClassificationTask`` trained by ``LocalTrainer`` with the ``optimizer``
  section of each ``examples/vit/*.json`` built as ``ClassificationTask.from_config`` builds it, so the
  ``ClassyOptimizer`` steps at ``task.where`` (``simulated_global_batchsize`` and its accumulation).

The world size reaches these libraries only through their samplers' and batch-size arithmetic
(``get_dist_info`` / ``get_world_size``), which are patched: this process stands for rank 0 of W. Each
run is compared with ``vit-accel plan --json``'s per-step ``lr``. The sources' settings below are their
files' (commits named); the recipes are read from configs/, so a recipe that drifts from its source fails.

With gradient accumulation the sources count forward passes (mmcv's and mmengine's hooks per
iteration, ClassyVision's ``where`` per batch): each update then takes the rate of the last
forward pass of its accumulation period, ``(a - 1) / a`` of a step ahead of ours. Where that
happens (vit-l16-classy at its 64 GPUs, and each source run with accumulation) the test checks the
difference is exactly that, and below one step's change of the rate; the recipes document it.

Training set sizes are small (5 optimizer steps per epoch with a short last batch) so whole runs
take seconds; the epoch length at ImageNet's 1,281,167 is checked against the real samplers.
"""
import json
import logging
import math
from dataclasses import replace
from unittest import mock

import pytest
import torch

from vit_accel.cli import main
from vit_accel.config import load_recipe
from vit_accel.engine.schedule import build_schedule

mmcv_runner = pytest.importorskip("mmcv.runner", reason="mmcv 1.x is a test oracle (make test installs it)")
mmengine_runner = pytest.importorskip("mmengine.runner", reason="mmengine is a test oracle ('.[test]')")
classy_tasks = pytest.importorskip("classy_vision.tasks", reason="ClassyVision is a test oracle ('.[test]')")

IMAGENET = 1_281_167
SMALL = 5 * 4096 - 1000    # 5 optimizer steps per epoch at global batch 4,096 (SMALL // 8 at 512), short last batch


def plan_lrs(capsys, name, backend, world_size, train_samples=None):
    """``vit-accel plan --json``'s learning rate of every optimizer step."""
    args = ["plan", "--backend", backend, "--config", name, "--world-size", str(world_size), "--json"]
    if train_samples:
        args += ["--train-samples", str(train_samples)]
    capsys.readouterr()                       # what the sources logged
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)["schedule"]["lr"]


def per_forward_pass(name, accumulation, train_samples=None):
    """Our schedule counted in forward passes (a x the steps, global batch / a), sampled at the
    last forward pass of each accumulation period: what a source that counts iterations gives."""
    r = load_recipe(name)
    s, a = r.schedule, accumulation
    s = replace(s, total_steps=s.total_steps * a, warmup_steps=s.warmup_steps * a)
    lrs = build_schedule(s, r.optim.lr, r.train.global_batch_size // a, train_samples).lrs()
    return lrs[a - 1::a]


def assert_same(source, ours):
    assert len(source) == len(ours)
    assert source == pytest.approx(ours, rel=1e-12, abs=1e-15)


def assert_one_step_apart(source, ours):
    """The forward-pass counting: ahead of ours by less than one step's change of the rate (the larger
    of the steps on either side, where the warm-up turns into the decay)."""
    assert len(source) == len(ours)
    steps = [abs(b - a) for a, b in zip(ours, ours[1:])]
    steps = [max(x, y) for x, y in zip([0.0] + steps, steps + [steps[-1]])]
    bad = [i for i, (s, o, step) in enumerate(zip(source, ours, steps)) if abs(s - o) > step * 1.0001 + 1e-15]
    assert not bad, [(i, source[i], ours[i]) for i in bad[:5]]
    assert max(abs(s - o) for s, o in zip(source, ours)) > 0


# ---------------------------------------------------------------------------------------
# mmcv 1.x: mmcls 0.x vit-base-p16_ft-4xb544-ipu_in1k (mmcls-0.x 4ec25097)
# ---------------------------------------------------------------------------------------

MMCLS_IPU = dict(lr=0.08, max_iters=5000,
                 lr_config=dict(policy="CosineAnnealing", min_lr=0, warmup="linear", warmup_iters=800,
                                warmup_ratio=0.02))


class _MMCVModel(torch.nn.Module):
    """A step that does nothing; the runner's hooks set the rate, the optimizer hook steps."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def train_step(self, data, optimizer, **kwargs):
        return {"loss": self.w.sum() * 0.0}


def mmcv_run(tmp_path, max_iters, lr_config, cumulative_iters=1):
    """The rate of every optimizer update of an IterBasedRunner run."""
    import itertools

    model = _MMCVModel()
    opt = torch.optim.SGD(model.parameters(), lr=MMCLS_IPU["lr"], momentum=0.9)
    seen = []
    real_step = opt.step

    def step(*a, **k):
        seen.append(opt.param_groups[0]["lr"])
        return real_step(*a, **k)

    opt.step = step
    runner = mmcv_runner.IterBasedRunner(model, optimizer=opt, work_dir=str(tmp_path),
                                         logger=logging.getLogger("mmcv-oracle"), max_iters=max_iters)
    optimizer_config = (dict(grad_clip=None) if cumulative_iters == 1 else
                        dict(type="GradientCumulativeOptimizerHook", cumulative_iters=cumulative_iters))
    runner.register_training_hooks(lr_config=dict(lr_config, by_epoch=False), optimizer_config=optimizer_config)
    runner.run([itertools.repeat(None)], [("train", 1)])
    return seen


def test_mmcv_runner_gives_the_ipu_recipes_rate_at_every_step(tmp_path, capsys):
    """One runner iteration per optimizer step, as on the IPUs (the accumulation of 32 happens inside
    the device) and on GPUs whose per-GPU batch is the recipe's share."""
    source = mmcv_run(tmp_path, MMCLS_IPU["max_iters"], MMCLS_IPU["lr_config"])
    assert len(source) == 5000 and source[0] == pytest.approx(0.08 * 0.02)
    for backend, world in (("ipu", 4), ("gpu", 8), ("gpu", 1)):   # 4 replicas; 8 GPUs: accumulation 2; 1: 16
        assert_same(source, plan_lrs(capsys, "vit-b16-ft", backend, world))


def test_mmcv_runner_with_accumulation_counts_iterations(tmp_path, capsys):
    """GradientCumulativeOptimizerHook: the LR hook still runs every iteration (max_iters and the warm-up
    count iterations), so each update takes the rate of its period's last iteration."""
    a = 2
    cfg = dict(MMCLS_IPU["lr_config"], warmup_iters=800 * a)
    source = mmcv_run(tmp_path, 5000 * a, cfg, cumulative_iters=a)
    assert_same(source, per_forward_pass("vit-b16-ft", a))
    assert_one_step_apart(source, plan_lrs(capsys, "vit-b16-ft", "gpu", 8))


# ---------------------------------------------------------------------------------------
# mmengine: mmpretrain 1.x vit-base-p16_32xb128-mae_in1k (mmpretrain ee7f2e88)
# ---------------------------------------------------------------------------------------

MMPRETRAIN = dict(
    lr=1e-4 * 4096 / 256, max_epochs=300,
    param_scheduler=[dict(type="LinearLR", start_factor=1e-3, by_epoch=True, end=20, convert_to_iter_based=True),
                     dict(type="CosineAnnealingLR", eta_min=1e-5, by_epoch=True, begin=20)])


class _Samples:
    """N samples whose loading costs nothing (``__getitems__``: one call per batch)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i

    def __getitems__(self, indices):
        return indices


def _mmengine_model():
    from mmengine.model import BaseModel

    class NoOp(BaseModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, *args, **kwargs):
            return {}

        def train_step(self, data, optim_wrapper):
            opt = optim_wrapper.optimizer
            if not getattr(opt, "_recorded", False):   # record the rate of every real update
                real_step = opt.step

                def step(*a, **k):
                    self.seen.append(opt.param_groups[0]["lr"])
                    return real_step(*a, **k)

                opt.step, opt._recorded = step, True
            optim_wrapper.update_params(self.w.sum() * 0.0)
            return {}

    return NoOp()


def mmengine_run(tmp_path, world_size, batch_per_process, train_samples, accumulative_counts=1):
    import mmengine.dataset.sampler as sampler_module

    model = _mmengine_model()
    with mock.patch.object(sampler_module, "get_dist_info", return_value=(0, world_size)):
        runner = mmengine_runner.Runner(
            model=model, work_dir=str(tmp_path), default_scope="mmengine", log_level="WARNING",
            train_dataloader=dict(dataset=_Samples(train_samples), batch_size=batch_per_process, num_workers=0,
                                  sampler=dict(type="DefaultSampler", shuffle=False),
                                  collate_fn=dict(type="pseudo_collate")),
            optim_wrapper=dict(optimizer=dict(type="AdamW", lr=MMPRETRAIN["lr"], betas=(0.9, 0.95)),
                               accumulative_counts=accumulative_counts),
            param_scheduler=MMPRETRAIN["param_scheduler"],
            train_cfg=dict(by_epoch=True, max_epochs=MMPRETRAIN["max_epochs"]),
            default_hooks=dict(param_scheduler=dict(type="ParamSchedulerHook"), checkpoint=None, logger=None,
                               timer=None, sampler_seed=None))
        iterations_per_epoch = len(runner.train_dataloader)
        runner.train()
    return model.seen, iterations_per_epoch


def test_mmengine_epoch_length_is_the_recipes_steps_per_epoch():
    """A real DefaultSampler (no shuffle, padded to the world size) under a DataLoader: mmengine's
    epoch length is ceil(ceil(N / W) / batch), which is ceil(N / global batch) for every W."""
    import mmengine.dataset.sampler as sampler_module
    from mmengine.dataset import DefaultSampler
    from torch.utils.data import DataLoader

    r = load_recipe("vit-b16-scratch")
    for n in (IMAGENET, SMALL, 4096 * 7):
        ours = build_schedule(r.schedule, r.optim.lr, 4096, n).steps_per_epoch
        for world, batch in ((32, 128), (8, 512), (16, 256)):
            with mock.patch.object(sampler_module, "get_dist_info", return_value=(0, world)):
                loader = DataLoader(_Samples(n), batch_size=batch, sampler=DefaultSampler(_Samples(n), shuffle=False))
            assert len(loader) == ours, (n, world)
    assert build_schedule(r.schedule, r.optim.lr, 4096, IMAGENET).steps_per_epoch == 313


@pytest.mark.parametrize("world_size, batch", [(32, 128), (8, 512)])
def test_mmengine_runner_gives_the_scratch_recipes_rate_at_every_step(tmp_path, capsys, world_size, batch):
    """32 GPUs x 128, the recipe's own; 8 processes, where we accumulate 4 micro-batches of 128 and the
    source's loader gives each process its 512 at once."""
    source, epoch = mmengine_run(tmp_path, world_size, batch, SMALL)
    assert epoch == 5 and len(source) == 300 * 5
    assert_same(source, plan_lrs(capsys, "vit-b16-scratch", "gpu", world_size, SMALL))
    assert source[0] == pytest.approx(1.6e-6) and source[20 * 5] == pytest.approx(1.6e-3)


def test_mmengine_runner_with_accumulative_counts_counts_iterations(tmp_path, capsys):
    """``accumulative_counts=4`` at 8 x 128: ParamSchedulerHook steps the iteration-based LinearLR after
    every iteration, so the warm-up spans 4x the iterations and each update comes 3 iterations late."""
    source, epoch = mmengine_run(tmp_path, 8, 128, SMALL, accumulative_counts=4)
    assert epoch == 20 and len(source) == 300 * 5
    assert_same(source, per_forward_pass("vit-b16-scratch", 4, SMALL))
    assert_one_step_apart(source[:20 * 5], plan_lrs(capsys, "vit-b16-scratch", "gpu", 8, SMALL)[:20 * 5])


# ---------------------------------------------------------------------------------------
# ClassyVision: examples/vit/*.json (ClassyVision 0.7.0)
# ---------------------------------------------------------------------------------------

def _composite(peak):
    return {"name": "composite", "update_interval": "step", "interval_scaling": ["rescaled", "fixed"],
            "lengths": [0.1, 0.9], "schedulers": [{"name": "linear", "start_value": 0, "end_value": peak},
                                                  {"name": "cosine", "start_value": peak, "end_value": 0}]}


PRETRAIN = {"name": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.3, "param_schedulers": {"lr": _composite(0.003)}}
FINETUNE = {"name": "sgd", "weight_decay": 0, "momentum": 0.9, "nesterov": True,
            "param_schedulers": {"lr": {"name": "cosine", "start_value": 0.01, "end_value": 0}}}
# recipe -> (num_epochs, simulated_global_batchsize, batchsize_per_replica, optimizer) of its JSON
CLASSY = {
    "vit-b32-classy": (300, 4096, 256, PRETRAIN), "vit-b16-classy": (300, 4096, 64, PRETRAIN),
    "vit-l32-classy": (300, 4096, 64, PRETRAIN), "vit-l16-classy": (300, 4096, 16, PRETRAIN),
    "vit-b32-classy-ft-384": (8, 512, 64, FINETUNE), "vit-b16-classy-ft-384": (8, 512, 16, FINETUNE),
    "vit-l32-classy-ft-384": (8, 512, 16, FINETUNE), "vit-l16-classy-ft-384": (8, 512, 4, FINETUNE),
}


def classy_run(num_epochs, simulated, per_replica, optimizer, world_size, train_samples):
    """ClassificationTask + LocalTrainer over a dataset of ``train_samples`` trivial samples; the rate
    of every update, read after ``ClassyOptimizer.step(where=task.where)``."""
    import copy

    import classy_vision.dataset.classy_dataset as dataset_module
    from classy_vision.dataset import ClassyDataset
    from classy_vision.models import ClassyModel
    from classy_vision.optim import build_optimizer, build_optimizer_schedulers
    from classy_vision.trainer import LocalTrainer

    sample = {"input": torch.zeros(1), "target": torch.zeros((), dtype=torch.long)}

    class Samples(ClassyDataset):             # one fetch per batch (the DataLoader's __getitems__)
        def __getitems__(self, indices):
            return [sample] * len(indices)

    class NoOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, 1))

        def forward(self, x):
            return x @ self.w

    class NoLoss(torch.nn.Module):
        def forward(self, output, target):
            return output.sum() * 0.0

    config = dict(copy.deepcopy(optimizer), num_epochs=num_epochs)   # as ClassificationTask.from_config
    dataset = Samples(_Samples(train_samples), per_replica, False, None, None)
    dataset.set_num_workers(0)
    task = (classy_tasks.ClassificationTask().set_num_epochs(num_epochs)
            .set_loss(NoLoss()).set_model(ClassyModel.from_model(NoOp()))
            .set_optimizer(build_optimizer(config)).set_optimizer_schedulers(build_optimizer_schedulers(config))
            .set_simulated_global_batchsize(simulated).set_dataset(dataset, "train").set_meters([]))
    seen, real_step = [], task.optimizer.step

    def step(*a, **k):
        real_step(*a, **k)
        seen.append(task.optimizer.param_groups[0]["lr"])

    task.optimizer.step = step
    with mock.patch.object(dataset_module, "get_world_size", return_value=world_size):
        LocalTrainer().train(task)
    return seen, task.optimizer_period


@pytest.mark.parametrize("name", list(CLASSY))
def test_classyvision_task_gives_each_recipes_rate_at_every_step(capsys, name):
    """Each JSON at the world size where its per-replica batch makes the simulated batch without
    accumulation; our plan at the recipe's 64 processes (or 32 for fine-tuning) and at 4 processes."""
    epochs, simulated, per_replica, optimizer = CLASSY[name]
    n = SMALL // (4096 // simulated)
    source, period = classy_run(epochs, simulated, per_replica, optimizer, simulated // per_replica, n)
    assert period == 1 and len(source) == epochs * 5
    for world in (64 if epochs == 300 else 32, 4):
        assert_same(source, plan_lrs(capsys, name, "gpu", world, n))


@pytest.mark.slow
def test_classyvision_with_accumulation_counts_forward_passes(capsys):
    """vit-l16-classy at its 64 GPUs: 16 per replica is 1,024, so ClassyVision accumulates 4 batches
    and evaluates ``where`` at the last forward pass of each period: 0.75 step ahead of our plan."""
    epochs, simulated, per_replica, optimizer = CLASSY["vit-l16-classy"]
    source, period = classy_run(epochs, simulated, per_replica, optimizer, 64, SMALL)
    assert period == 4 and len(source) == 300 * 5
    assert_same(source, per_forward_pass("vit-l16-classy", 4, SMALL))
    ours = plan_lrs(capsys, "vit-l16-classy", "gpu", 64, SMALL)
    assert_one_step_apart(source, ours)
    slope = 0.003 * math.pi / 2 / (300 * 5)   # the cosine's steepest change per step
    assert max(abs(s - o) for s, o in zip(source[150:], ours[150:])) <= 0.75 * slope * 1.0001
