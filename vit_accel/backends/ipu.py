"""IPU backend: the ViT as a PopTorch pipeline (Graphcore IPUs, Poplar SDK 3.x).

Written against PopTorch 3.x as documented in the shared reference/poptorch.md, following
how mmcv 1.x drove MMClassification's ``vit-base-p16_ft-4xb544-ipu_in1k``:

* the recipe's ``ipu`` section becomes one ``poptorch.Options`` (``build_options``);
* the stage plan (backends/pipeline.py) is applied with ``poptorch.BeginBlock`` at each
  stage start and ``poptorch.recomputationCheckpoint`` on every block output (forward hooks,
  so model.py and the state_dict stay as on every backend);
* a training wrapper returns ``(logits, loss)`` with the loss through
  ``poptorch.identity_loss(loss, reduction="none")``; one ``trainingModel`` call runs
  micro-batch x gradient accumulation x local replicas x device iterations images: forward,
  backward and ``device_iterations`` optimizer steps;
* evaluation runs a separate ``inferenceModel`` (replication 1, accumulation 1, device
  iterations 1, ShardedExecution, as mmcv); the two executors take turns on the IPUs
  (detachFromDevice / attachToDevice).

``import poptorch`` happens only in ``_poptorch()``; tests put a test double in
``sys.modules["poptorch"]`` so this exact code runs on the CPU. Python 3.8 / torch 2.0.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, Recipe
from ..engine.loss import training_loss
from .base import Backend, StepResult, full_weights, read_checkpoint, write_checkpoint
from .pipeline import build_plan
from .stages import StagePlan

log = logging.getLogger(__name__)

# import poptorch asserts one torch version per SDK (reference/poptorch.md)
SDK_TORCH = {"3.0": "1.10.0", "3.1": "1.13.0", "3.2": "1.13.1", "3.3": "2.0.1", "3.4": "2.0.1"}
INSTALL_HINT = ("install the Poplar SDK, `source <sdk>/enable.sh`, then `pip install "
                "$POPLAR_SDK_ENABLED/../poptorch-*.whl` into an environment with the torch it pins (SDK "
                + ", ".join(f"{k} -> torch {v}" for k, v in SDK_TORCH.items()) + ")")


def _poptorch():
    """The poptorch module; the one place it is imported (tests substitute a double here)."""
    import poptorch

    return poptorch


def _popdist():
    """popdist when this process was started by poprun, else None.

    Unverified beyond Graphcore's public examples: ``popdist.isPopdistEnvSet()``,
    ``popdist.poptorch.Options(ipus_per_replica=...)``, ``getNumLocalReplicas()``,
    ``getNumTotalReplicas()``, ``getInstanceIndex()``, ``getNumInstances()``.
    """
    try:
        import popdist
    except ImportError:
        return None
    return popdist if popdist.isPopdistEnvSet() else None


def _popart():
    try:
        import popart
    except ImportError:
        return None
    return popart


def device_seed(seed: int, step: int) -> int:
    """The IPU RNG seed of the call that starts at optimizer step ``step`` (the same on every
    instance, as PopTorch asks of ``randomSeed`` under poprun)."""
    return (seed * 1_000_003 + step * 7_919) % (2 ** 63)


def init_host_group(rank: int, world_size: int) -> None:
    """A gloo process group over the poprun instances for what the host reduces itself
    (validation metrics, the run directory, data positions, the checkpoint barrier); the
    gradients travel between IPUs, not through it. Rendezvous: MASTER_ADDR / MASTER_PORT
    (launch/poprun.sh exports them to every instance)."""
    if world_size <= 1 or torch.distributed.is_initialized():
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"poprun with {world_size} instances: {' and '.join(missing)} not set; the instances "
                          f"meet on MASTER_ADDR:MASTER_PORT for the host reductions (launch/poprun.sh sets both; "
                          f"by hand: export MASTER_ADDR=<first host> MASTER_PORT=29500 and pass them with "
                          f"--mpi-local-args='-x MASTER_ADDR -x MASTER_PORT')")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------

def _choice(what: str, value: str, table: Dict[str, Any]) -> Any:
    if value not in table:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(table)}")
    return table[value]


def _dtype(what: str, value: str) -> torch.dtype:
    return _choice(what, value, {"half": torch.half, "float": torch.float})


def build_options(recipe: Recipe, poptorch):
    """The training ``poptorch.Options`` for a recipe's ``ipu`` section."""
    ipu = recipe.ipu
    pd = _popdist()
    if pd is not None:
        import popdist.poptorch

        # poprun decides the local replicas, the process id and the device; do NOT call
        # replicationFactor (popdist's own rule)
        opts = popdist.poptorch.Options(ipus_per_replica=ipu.ipus_per_replica)
    else:
        opts = poptorch.Options()
        opts.replicationFactor(ipu.replicas)
    opts.deviceIterations(ipu.device_iterations)
    opts.Training.gradientAccumulation(ipu.gradient_accumulation)
    opts.Training.accumulationAndReplicationReductionType(_choice(
        "ipu.reduction", ipu.reduction, {"mean": poptorch.ReductionType.Mean, "sum": poptorch.ReductionType.Sum}))
    opts.outputMode(_choice("ipu.output_mode", ipu.output_mode,
                            {"final": poptorch.OutputMode.Final, "all": poptorch.OutputMode.All,
                             "sum": poptorch.OutputMode.Sum, "default": poptorch.OutputMode.Default}))
    # stage = ipu_id of each BeginBlock; the plan numbers IPUs 0..n-1 in ascending order
    opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.SameAsIpu))
    opts.setAvailableMemoryProportion({f"IPU{i}": ipu.available_memory_proportion
                                       for i in range(ipu.ipus_per_replica)})
    opts.Precision.setPartialsType(_dtype("ipu.partials_type", ipu.partials_type))
    opts.Precision.enableStochasticRounding(ipu.stochastic_rounding)
    opts.randomSeed(recipe.train.seed)
    if ipu.executable_cache:
        opts.enableExecutableCaching(ipu.executable_cache)
    on_chip = _choice("ipu.optimizer_location", ipu.optimizer_location, {"on_chip": True, "off_chip": False})
    opts.TensorLocations.setOptimizerLocation(
        poptorch.TensorLocationSettings().useOnChipStorage(on_chip)
        .useReplicatedTensorSharding(ipu.replicated_tensor_sharding))
    # As mmcv: gradient accumulators stay on chip (no streams), and the outer fragment of
    # accumulation is scheduled to overlap with memory in mind.
    opts._Popart.set("disableGradAccumulationTensorStreams", True)
    popart = _popart()
    if popart is not None:
        opts._Popart.set("accumulateOuterFragmentSettings.schedule",
                         int(popart.AccumulateOuterFragmentSchedule.OverlapMemoryOptimized))
    else:
        log.info("popart not importable: accumulate-outer-fragment schedule left at PopART's default")
    return opts


def build_inference_options(source, poptorch):
    """Evaluation options as mmcv: replication 1, accumulation 1, device iterations 1,
    ShardedExecution, all outputs. ``source``: the training Options (cloned, since a used
    Options object is frozen) or a Recipe."""
    opts = build_options(source, poptorch) if isinstance(source, Recipe) else source.clone()
    if _popdist() is None:
        opts.replicationFactor(1)
    opts.deviceIterations(1)
    opts.Training.gradientAccumulation(1)
    opts.setExecutionStrategy(poptorch.ShardedExecution(poptorch.AutoStage.SameAsIpu))
    opts.outputMode(poptorch.OutputMode.All)
    return opts


# ---------------------------------------------------------------------------------------
# Model: the plan applied, the loss inside the graph
# ---------------------------------------------------------------------------------------

def _checkpoint_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return _poptorch().recomputationCheckpoint(output)


def apply_plan(model: nn.Module, plan: StagePlan, poptorch) -> None:
    """``BeginBlock`` at each stage start (on its IPU) and a recomputation checkpoint after
    each planned block. Annotates ``model`` in place; call once per model."""
    if len(model.blocks) != plan.depth:
        raise ConfigError(f"the plan is for depth {plan.depth} but the model has {len(model.blocks)} blocks")
    for st in plan.stages:
        poptorch.BeginBlock(model.get_submodule(st.start), f"stage{st.index}:{st.start}", ipu_id=st.ipu)
    for i in plan.recompute:
        model.blocks[i].register_forward_hook(_checkpoint_output)


class TrainingWrapper(nn.Module):
    """forward(images, labels) -> (logits, loss); the loss marked with identity_loss as mmcv."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.model(images)
        loss = training_loss(logits, labels, self.label_smoothing)
        return logits, _poptorch().identity_loss(loss, reduction="none")


def build_optimizer(model: nn.Module, recipe: Recipe, poptorch):
    """poptorch.optim.SGD (or AdamW) over the shared parameter groups, with the recipe's fp16
    settings. Arguments we pass are variables PopTorch may change later (lr is)."""
    from ..engine.optim import param_groups

    o, ipu = recipe.optim, recipe.ipu
    # layer-wise decay: each group starts at its own rate; its scale stays on the host (lr_scales), so
    # PopTorch sees plain groups whose "lr" is a variable pushed by setOptimizer
    groups = [dict({k: v for k, v in g.items() if k != "lr_scale"}, lr=o.lr * g.get("lr_scale", 1.0))
              for g in param_groups(model, o)]
    common: Dict[str, Any] = dict(lr=o.lr, weight_decay=o.weight_decay, loss_scaling=ipu.loss_scaling,
                                  accum_type=_dtype("ipu.accum_type", ipu.accum_type))
    if o.clip_grad_norm > 0:
        common["max_grad_norm"] = o.clip_grad_norm   # the only gradient clipping PopTorch has
    if o.name == "sgd":
        return poptorch.optim.SGD(groups, momentum=o.momentum, nesterov=o.nesterov, use_combined_accum=False,
                                  velocity_accum_type=_dtype("ipu.velocity_accum_type", ipu.velocity_accum_type),
                                  **common)
    if o.name == "adamw":
        vel = _dtype("ipu.velocity_accum_type", ipu.velocity_accum_type)
        return poptorch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, first_order_momentum_accum_type=vel,
                                    second_order_momentum_accum_type=torch.float32, **common)
    raise ConfigError(f"optim.name: {o.name!r} has no PopTorch optimizer here; use sgd or adamw")


# ---------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------

# async_rebatched (the recipe's word, after poptorch.DataLoaderMode.AsyncRebatched): the loader is read
# ahead on the host by ipu_feed.ReadAhead, which keeps the exact position for checkpoints
LOADER_MODES = {"sync": "the loader as it is", "async_rebatched": "read ahead by a host thread"}


class IPUBackend(Backend):
    name = "ipu"

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.plan = build_plan(recipe)          # validate before any device work
        ipu = recipe.ipu
        _choice("ipu.loader_mode", ipu.loader_mode, LOADER_MODES)
        self._local_replicas = ipu.replicas
        pd = _popdist()
        if pd is not None:                      # poprun: replicas split over instances (unverified)
            if hasattr(pd, "init"):
                pd.init()
            if pd.getNumTotalReplicas() != ipu.replicas:
                raise ConfigError(f"poprun --num-replicas {pd.getNumTotalReplicas()} but ipu.replicas is "
                                  f"{ipu.replicas}; they must agree (the global batch depends on it)")
            self._local_replicas = pd.getNumLocalReplicas()
            init_host_group(pd.getInstanceIndex(), pd.getNumInstances())
        self.optimizer = None
        self.options = None
        self.train_model = None
        self.infer_model = None
        self._on_device: Optional[str] = None   # which executor holds the IPUs: "train" / "eval"
        self._lr: Optional[float] = None        # the lr the executor holds; None: unknown, write it
        self._step = 0                          # optimizer steps done: the next call's device RNG seed
        self._feed_prepares = False             # wrap_train_loader's feed yields normalized images
        mean = torch.tensor(recipe.data.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(recipe.data.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / std, -mean / std

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            poptorch = _poptorch()
        except ImportError:
            return f"PopTorch is not installed (torch here is {torch.__version__}): {INSTALL_HINT}"
        except Exception as e:  # e.g. its assertion on the torch version
            return f"PopTorch failed to import ({e}): {INSTALL_HINT}"
        check = getattr(poptorch, "ipuHardwareIsAvailable", None)
        if callable(check) and not os.environ.get("POPTORCH_IPU_MODEL"):
            try:
                attached = bool(check(1))
            except Exception:   # cannot tell here; the first compile will say
                attached = True
            if not attached:
                return ("PopTorch imports but no IPU is attached (poptorch.ipuHardwareIsAvailable() is False): "
                        "run on an IPU host or V-IPU partition (see `gc-info -l`, or launch with "
                        "launch/poprun.sh), or set POPTORCH_IPU_MODEL=1 for the simulator")
        return None

    def model_options(self) -> Dict[str, Any]:
        # explicit matmul-softmax-matmul, as Graphcore's ViT: PopTorch has no SDPA handler
        return {"attn_impl": "eager", "norm_impl": "torch", "mlp_impl": "torch"}

    # -- batch granularity ----------------------------------------------------------------
    @property
    def micro_batch_size(self) -> int:
        return self.recipe.ipu.micro_batch_size

    @property
    def gradient_accumulation(self) -> int:
        return self.recipe.ipu.gradient_accumulation

    @property
    def steps_per_call(self) -> int:
        return self.recipe.ipu.device_iterations

    @property
    def local_replicas(self) -> int:
        return self._local_replicas

    @property
    def batch_per_call(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation * self.local_replicas * self.steps_per_call

    @property
    def eval_batch_size(self) -> int:
        return self.recipe.train.eval_batch_size or self.micro_batch_size

    # -- setup ----------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        from ..engine.optim import param_groups

        poptorch = _poptorch()
        ipu = self.recipe.ipu
        model.train()                            # the executor copies .training at wrap time
        if ipu.half:
            model.half()
        apply_plan(model, self.plan, poptorch)
        self.model = model
        self.optimizer = build_optimizer(model, self.recipe, poptorch)
        self.lr_scales = [g.get("lr_scale", 1.0) for g in param_groups(model, self.recipe.optim)]
        self._lr = self.recipe.optim.lr
        self.options = build_options(self.recipe, poptorch)
        wrapper = TrainingWrapper(model, self.recipe.optim.label_smoothing)
        self.train_model = poptorch.trainingModel(wrapper, options=self.options, optimizer=self.optimizer)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> normalized fp16 (or fp32) on the host, as mmcls's Normalize + ToHalf: the
        reference documents fp16/fp32 inputs only, so uint8 never crosses to the IPU. One fp32
        copy scaled and shifted in place: 2.4x the CPU rate of subtract-then-divide (the host
        feed does this for every image, tests/bench/test_bench_ipu_feed.py)."""
        x = images.to(torch.float32, copy=True).mul_(self._scale).add_(self._shift)
        return (x.half() if self.recipe.ipu.half else x).contiguous()

    def _use(self, which: str) -> None:
        """Hand the IPUs to the training or the inference executor (mmcv alternated the same
        way): detaching copies weights and optimizer state to the host, attaching uploads."""
        if self._on_device == which:
            return
        other = self.infer_model if which == "train" else self.train_model
        if other is not None and other.isCompiled() and other.isAttachedToDevice():
            other.detachFromDevice()
        mine = self.train_model if which == "train" else self.infer_model
        if mine is not None and mine.isCompiled() and not mine.isAttachedToDevice():
            mine.attachToDevice()
            if which == "eval":
                mine.copyWeightsToDevice()       # the weights training changed since the last eval
        self._on_device = which

    # -- steps ----------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        if images.shape[0] != self.batch_per_call:
            ipu = self.recipe.ipu
            raise ValueError(f"ipu train_step got {images.shape[0]} images; one call takes micro-batch "
                             f"{ipu.micro_batch_size} x accumulation {ipu.gradient_accumulation} x local replicas "
                             f"{self.local_replicas} x device iterations {ipu.device_iterations} = "
                             f"{self.batch_per_call}")
        self._use("train")
        if lr != self._lr:
            for g, scale in zip(self.optimizer.param_groups, self.lr_scales):
                g["lr"] = lr * scale
            if self.train_model.isCompiled():   # before the first call the compile reads it
                self.train_model.setOptimizer(self.optimizer)
            self._lr = lr
        x = images if self._feed_prepares and images.dtype != torch.uint8 else self.prepare(images)
        if not self.train_model.isCompiled():
            self.train_model.compile(x, labels)  # the RNG state can be set on a compiled executor only
        # The device RNG (dropout) restarts each call from (seed, step), as the host RNG does in the
        # trainer: a resumed run draws the masks an uninterrupted one draws. Only the seed is sent.
        self.train_model.rng_state = [device_seed(self.recipe.train.seed, self._step)]
        _, loss = self.train_model(x, labels)
        self._step += self.steps_per_call
        return StepResult(loss=float(loss.float().mean()))

    @torch.no_grad()
    def eval_step(self, images: torch.Tensor) -> torch.Tensor:
        b, n = self.eval_batch_size, images.shape[0]
        if n > b:
            raise ValueError(f"ipu eval_step got {n} images; the inference model is compiled for {b}")
        if self.infer_model is None:
            poptorch = _poptorch()
            self.model.eval()                    # the inference executor keeps eval mode...
            self.infer_model = poptorch.inferenceModel(self.model, build_inference_options(self.options, poptorch))
            self.model.train()                   # ...and the host model goes back to training
        self._use("eval")
        x = self.prepare(images)
        if n < b:                                # shapes are fixed at compile time: pad, then trim
            x = torch.cat([x, x.new_zeros((b - n,) + tuple(x.shape[1:]))])
        return self.infer_model(x)[:n].float().cpu()

    # -- loader -----------------------------------------------------------------------------
    def wrap_train_loader(self, loader):
        """``ipu.loader_mode`` async_rebatched: the trainer's resumable loader read
        ``ipu.buffer_size`` calls ahead by a host thread that also normalizes and casts the
        images (``ipu_feed.ReadAhead``; checkpoints keep the exact position); sync: unchanged."""
        from .ipu_feed import ReadAhead

        ipu = self.recipe.ipu
        if ipu.loader_mode == "sync" or not hasattr(loader, "state_dict"):
            return loader
        mix = self.recipe.data.mixup > 0 or self.recipe.data.cutmix > 0
        self._feed_prepares = not mix           # mixup runs in the trainer, between feed and step
        return ReadAhead(loader, None if mix else self.prepare, depth=ipu.buffer_size)

    # -- state ------------------------------------------------------------------------------
    def _train_model_on_device(self) -> bool:
        return self.train_model is not None and self.train_model.isCompiled() and self.train_model.isAttachedToDevice()

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """fp32 timm-keyed weights read from the host model after copying them from the IPUs."""
        if self._train_model_on_device():
            self.train_model.copyWeightsToHost()
        return full_weights(self.model)

    def save_state(self, path, extra: Dict[str, Any]):
        return write_checkpoint(path, self.model_state_dict(), self.optimizer.state_dict(), extra, self.name)

    def load_state(self, path, trust: bool = False) -> Dict[str, Any]:
        """Resume: weights and optimizer state as every backend, then the step (the device RNG
        seeds follow it) and a forgotten learning rate: the optimizer now holds the
        checkpoint's, so the next step writes its own and pushes it with setOptimizer."""
        payload = read_checkpoint(path, trust, self.name)
        self.model.load_state_dict(payload["model"])   # copy_ casts fp32 -> the model's fp16
        if self._train_model_on_device():
            self.train_model.copyWeightsToDevice()
        if payload["optimizer"] is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
        self._step = int(payload.get("step", 0))
        self._lr = None
        return payload

    def close(self) -> None:
        for ex in (self.infer_model, self.train_model):
            if ex is not None:
                ex.destroy()
        self.infer_model = self.train_model = None
        self._on_device = None
        super().close()
