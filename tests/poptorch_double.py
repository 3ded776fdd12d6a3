"""TEST DOUBLE of the PopTorch 3.x surface vit-accel uses -- not PopTorch.

Tests put this module in ``sys.modules["poptorch"]`` so the production code in
vit_accel/backends/ipu.py runs unchanged on the CPU. It follows /work/shared/reference/
poptorch.md (checked against graphcore/poptorch sdk-release-3.4): Options setters chain
and are frozen by DataLoader / trainingModel / inferenceModel ("Can't modify frozen
Options"); BeginBlock registers a forward pre-hook and refuses a second annotation; one
executor call consumes micro x deviceIterations x replicationFactor x gradientAccumulation
samples laid out [D, G, R, micro] and runs forward, backward and the update; returned
shapes follow outputMode. The IPU's RNG is a stream apart from the host's: the executor
keeps its own state, seeded from ``Options.randomSeed`` when it compiles and set through the
``rng_state`` property ([seed] or [seed] + state; compiled executors only), as PopTorch 3.2+.
Several processes (reference section 7): ``Options.Distributed`` reads OMPI_COMM_WORLD_RANK /
OMPI_COMM_WORLD_SIZE; with more than one process the gradients of every replica of every
process are combined before each update (the distributed replicated graph; here a
torch.distributed all-reduce, which the test initialises with gloo) and ``DataLoader`` gives
each process a disjoint slice of a map-style dataset. Emulated, not modelled: IPU memory,
compilation, real pipelining, fp16 stochastic rounding, partials, PopART options (recorded
only). Unverified points of the reference stay unverified here (the output ordering of All
is presumed [D, G, R]).
"""
from __future__ import annotations

import copy
import enum
import os
import types

import torch

TEST_DOUBLE = True            # real PopTorch has no such attribute
__version__ = "3.4.0+double"
HARDWARE_IPUS = 64            # what ipuHardwareIsAvailable reports; tests may lower it
events = []                   # ("block", user_id, ipu_id) / ("checkpoint",) in execution order


class Error(RuntimeError):
    pass


NO_EXECUTABLE_ERR = "Model has not been compiled or has been destroyed."


class ReductionType(enum.IntEnum):
    Sum, Mean, NoReduction = range(3)


class MeanReductionStrategy(enum.IntEnum):
    Running, Post = range(2)


class OutputMode(enum.IntEnum):
    Final, EveryN, All, Sum, Default = range(5)


class AutoStage(enum.IntEnum):
    SameAsIpu, AutoIncrement = range(2)


class DataLoaderMode(enum.IntEnum):
    Sync, Async, AsyncRebatched = range(3)


class Stage:
    def __init__(self, *block_ids):
        self.block_ids, self._ipu = block_ids, None

    def ipu(self, n):
        self._ipu = n
        return self


class _Strategy:
    def __init__(self, *args):
        self.args = args or (AutoStage.SameAsIpu,)

    @property
    def auto_stage(self):
        return self.args[0] if len(self.args) == 1 and isinstance(self.args[0], AutoStage) else None


class PipelinedExecution(_Strategy):
    """Stages run concurrently, micro-batches flowing through (training)."""


class ShardedExecution(_Strategy):
    """One IPU at a time (mmcv's evaluation)."""


class TensorLocationSettings:
    def __init__(self):
        self.values = {}

    def _set(self, key, value):
        self.values[key] = value
        return self

    def useOnChipStorage(self, use=True):
        return self._set("onChip", use)

    def useReplicatedTensorSharding(self, use=True):
        return self._set("useReplicatedTensorSharding", use)

    def minElementsForOffChip(self, n):
        return self._set("minElementsForOffChip", n)

    def minElementsForReplicatedTensorSharding(self, n):
        return self._set("minElementsForReplicatedTensorSharding", n)


class _Sub:
    """A sub-object of Options (Training, Precision, ...): shares the parent's frozen flag."""

    def __init__(self, root):
        self._root = root

    def _set(self, **kw):
        self._root._check()
        self.__dict__.update(kw)
        return self


class _Training(_Sub):
    def gradientAccumulation(self, gradient_accumulation):
        return self._set(gradient_accumulation=gradient_accumulation)

    def accumulationAndReplicationReductionType(self, reduction_type):
        if reduction_type == ReductionType.NoReduction:
            raise ValueError("NoReduction is not a valid accumulationAndReplicationReductionType")
        return self._set(accumulation_and_replication_reduction_type=reduction_type)

    def setMeanAccumulationAndReplicationReductionStrategy(self, strategy):
        return self._set(meanAccumulationAndReplicationReductionStrategy=strategy)

    def setAutomaticLossScaling(self, enabled):
        return self._set(auto_loss_scaling=enabled)


class _Precision(_Sub):
    def setPartialsType(self, dtype):
        if dtype not in (torch.float, torch.half):
            raise ValueError(f"Invalid partials type {dtype}")
        return self._set(partials_type=dtype)

    def enableStochasticRounding(self, enabled):
        return self._set(stochastic_rounding=enabled)

    def enableFloatingPointExceptions(self, enabled):
        return self._set(floating_point_exceptions=enabled)


class _TensorLocations(_Sub):
    def setOptimizerLocation(self, loc):
        return self._set(optimizer=loc)

    def setWeightLocation(self, loc):
        return self._set(weight=loc)

    def setActivationLocation(self, loc):
        return self._set(activation=loc)

    def setAccumulatorLocation(self, loc):
        return self._set(accumulator=loc)


class _Popart(_Sub):
    def set(self, key, value):
        self._root._check()
        self.__dict__.setdefault("options", {})[key] = value
        return self


class _Distributed(_Sub):
    numProcesses, processId = 1, 0

    def configureProcessId(self, process_id, num_processes):
        return self._set(processId=process_id, numProcesses=num_processes)


class Options:
    def __init__(self):
        self._is_frozen = False
        self.device_iterations, self.replication_factor = 1, 1
        self.output_mode, self.output_return_period = OutputMode.Default, 1
        self.execution_strategy = PipelinedExecution(AutoStage.SameAsIpu)
        self.available_memory_proportion, self.random_seed, self.executable_cache = {}, None, None
        self.Training, self.Precision = _Training(self), _Precision(self)
        self.TensorLocations, self._Popart, self.Distributed = _TensorLocations(self), _Popart(self), _Distributed(self)
        self.Training.__dict__.update(gradient_accumulation=1,
                                      accumulation_and_replication_reduction_type=ReductionType.Mean)
        self.Distributed.__dict__.update(processId=int(os.environ.get("OMPI_COMM_WORLD_RANK", 0)),
                                         numProcesses=int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1)))

    def _check(self):
        if self._is_frozen:
            raise AttributeError("Can't modify frozen Options")

    def _freeze(self):
        self._is_frozen = True

    def _set(self, **kw):
        self._check()
        self.__dict__.update(kw)
        return self

    def deviceIterations(self, device_iterations):
        return self._set(device_iterations=device_iterations)

    def replicationFactor(self, replication_factor):
        return self._set(replication_factor=replication_factor)

    def outputMode(self, output_mode, output_return_period=None):
        assert isinstance(output_mode, OutputMode)
        assert output_mode != OutputMode.EveryN or (output_return_period or 0) > 0
        return self._set(output_mode=output_mode, output_return_period=output_return_period or 1)

    def setExecutionStrategy(self, strategy):
        assert isinstance(strategy, _Strategy)
        return self._set(execution_strategy=strategy)

    def setAvailableMemoryProportion(self, available_memory_proportion):
        for key in available_memory_proportion:
            assert key.startswith("IPU"), f"Invalid key: {key}"
        return self._set(available_memory_proportion=dict(available_memory_proportion))

    def randomSeed(self, random_seed):
        assert isinstance(random_seed, int)
        torch.manual_seed(random_seed)
        return self._set(random_seed=random_seed)

    def enableExecutableCaching(self, path):
        return self._set(executable_cache=path)

    def useIpuModel(self, use_model):
        return self._set(use_ipu_model=use_model)

    def autoRoundNumIPUs(self, auto_round_num_ipus=True):
        return self._set(auto_round_num_ipus=auto_round_num_ipus)

    def clone(self):
        c = copy.deepcopy(self)
        c._is_frozen = False
        return c


class _BlockHook:
    def __init__(self, user_id, ipu_id):
        self.user_id, self.ipu_id = user_id, ipu_id

    def __call__(self, module, inputs):
        events.append(("block", self.user_id, self.ipu_id))


def BeginBlock(layer_to_call, user_id=None, ipu_id=None):
    if any(isinstance(h, _BlockHook) for h in layer_to_call._forward_pre_hooks.values()):
        raise Error("module has already been assigned to a block.")
    layer_to_call.register_forward_pre_hook(_BlockHook(user_id, ipu_id))
    return layer_to_call


def recomputationCheckpoint(*tensors):
    events.append(("checkpoint",))
    return tensors[0] if len(tensors) == 1 else tensors


_loss = []


def identity_loss(x, reduction):
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be sum, mean or none, got {reduction!r}")
    out = x.sum() if reduction == "sum" else x.mean() if reduction == "mean" else x
    _loss.append(out)
    return out


def ipuHardwareIsAvailable(num_ipus=1):
    return HARDWARE_IPUS >= num_ipus


class _SGD(torch.optim.SGD):
    def __init__(self, params, lr, momentum=None, dampening=None, weight_decay=None, nesterov=None,
                 maximize=None, foreach=None, differentiable=None, loss_scaling=None, velocity_scaling=None,
                 use_combined_accum=None, accum_type=None, velocity_accum_type=None, max_grad_norm=None):
        for t in (accum_type, velocity_accum_type):
            if t not in (None, torch.float32, torch.float16):
                raise ValueError(f"Invalid accum type {t}: use torch.float32 or torch.float16")
        super().__init__(params, lr=lr, momentum=momentum or 0.0, dampening=dampening or 0.0,
                         weight_decay=weight_decay or 0.0, nesterov=bool(nesterov))
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        self.velocity_scaling, self.use_combined_accum = velocity_scaling, use_combined_accum
        self.accum_type, self.velocity_accum_type = accum_type, velocity_accum_type
        self.max_grad_norm = float("inf") if max_grad_norm is None else max_grad_norm


class _AdamW(torch.optim.AdamW):
    def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None, loss_scaling=None,
                 bias_correction=None, accum_type=None, first_order_momentum_accum_type=None,
                 second_order_momentum_accum_type=None, max_grad_norm=None):
        assert not amsgrad, "amsgrad must be False"
        super().__init__(params, lr=1e-3 if lr is None else lr, betas=betas or (0.9, 0.999), eps=eps or 1e-8,
                         weight_decay=1e-2 if weight_decay is None else weight_decay)
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        self.max_grad_norm = float("inf") if max_grad_norm is None else max_grad_norm


optim = types.SimpleNamespace(SGD=_SGD, AdamW=_AdamW)


class PoplarExecutor:
    def __init__(self, model, options, optimizer, training):
        self._user_model, self._options, self._training = model, options, training
        self._optimizer = optimizer
        # A shallow copy: parameters and buffers shared, `.training` flags frozen at wrap time.
        memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        self._model = copy.deepcopy(model, memo)
        self._shapes, self._attached = None, False
        self.optimizer_pushes = []          # lrs of each setOptimizer call, for tests
        self.rng_seeds = []                 # seeds written through rng_state, for tests
        self._seed, self._device_rng = None, None

    def compile(self, *args):
        if self.isCompiled():
            raise Error("Model has already been compiled")
        self._check_batch(self._cast(args))

    @property
    def rng_state(self):
        if not self.isCompiled():
            raise Error(NO_EXECUTABLE_ERR)
        return [self._seed] + self._device_rng.tolist()

    @rng_state.setter
    def rng_state(self, state):
        if not self.isCompiled():
            raise Error(NO_EXECUTABLE_ERR)
        self._seed = int(state[0])
        self.rng_seeds.append(self._seed)
        if len(state) > 1:
            self._device_rng = torch.tensor(state[1:], dtype=torch.uint8)
        else:
            self._device_rng = torch.Generator().manual_seed(self._seed).get_state()

    def isCompiled(self):
        return self._shapes is not None

    def isAttachedToDevice(self):
        return self._attached

    def detachFromDevice(self):
        if not self.isCompiled() or not self._attached:
            raise Error("Device is not attached")
        self._attached = False

    def attachToDevice(self):
        if not self.isCompiled() or self._attached:
            raise Error("Device is already attached")
        self._attached = True

    def copyWeightsToHost(self):            # the weights are the host weights here
        pass

    copyWeightsToDevice = copyWeightsToHost

    def setOptimizer(self, optimizer):
        self._optimizer = optimizer
        self.optimizer_pushes.append([g["lr"] for g in optimizer.param_groups])

    def destroy(self):
        self._attached = False
        self._user_model.__dict__.pop("_poptorch_wrapped", None)

    def _check_batch(self, args):
        o = self._options
        d, r, g = o.device_iterations, o.replication_factor, o.Training.gradient_accumulation
        for i, a in enumerate(args):
            if a.shape[0] % (d * r * g):
                raise Error(f"Invalid batch dimension: In the input {i}, the batch dimension ({a.shape[0]}) must "
                            f"be a multiple of Options.deviceIterations({d}) * Options.replicationFactor({r}) * "
                            f"Options.Training.gradientAccumulation({g}) = {d * r * g}")
        shapes = [(tuple(a.shape), a.dtype) for a in args]
        if self._shapes is None:
            strat = o.execution_strategy
            if strat.auto_stage == AutoStage.SameAsIpu:
                for m in self._model.modules():
                    for h in m._forward_pre_hooks.values():
                        if isinstance(h, _BlockHook) and h.ipu_id is None:
                            raise Error(f"poptorch.AutoStage.SameAsIpu was selected but no IPU was specified "
                                        f"for block {h.user_id}")
            self._shapes, self._attached = shapes, True       # first call compiles and attaches
            self._seed = o.random_seed if o.random_seed is not None else int(torch.initial_seed())
            self._device_rng = torch.Generator().manual_seed(self._seed).get_state()
        elif shapes != self._shapes:
            raise Error("Shape mismatch: the inputs don't match the inputs used to compile the model")
        if not self._attached:
            self.attachToDevice()
        return d, r, g, args[0].shape[0] // (d * r * g)

    @staticmethod
    def _cast(args):
        return [a.int() if a.dtype == torch.int64 else a.float() if a.dtype in (torch.float64, torch.bfloat16)
                else a for a in args]

    def __call__(self, *args):
        args = self._cast(args)
        d, r, g, micro = self._check_batch(args)
        with torch.random.fork_rng(devices=[]):              # dropout draws from the device's RNG
            torch.set_rng_state(self._device_rng)
            res = self._run(args, d, r, g, micro)
            self._device_rng = torch.get_rng_state()
        return res

    def _all_reduce_grads(self, params):
        """The replicas of the other processes: their gradients join before the update."""
        n = self._options.Distributed.numProcesses
        if n <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            raise Error(f"Options.Distributed.numProcesses is {n} but this double needs a torch.distributed "
                        f"group to stand in for the IPU links")
        mean = self._options.Training.accumulation_and_replication_reduction_type == ReductionType.Mean
        for p in params:
            dist.all_reduce(p.grad)
            if mean:
                p.grad.div_(n)

    def _run(self, args, d, r, g, micro):
        # PopART reads the flat batch as [deviceIterations, accumulation, replicas, micro_batch, ...]
        chunks = [[a.reshape(d, g, r, micro, *a.shape[1:])[di, gi, ri] for a in args]
                  for di in range(d) for gi in range(g) for ri in range(r)]
        outs = []
        for k, chunk in enumerate(chunks):
            if self._training and k % (g * r) == 0:
                self._optimizer.zero_grad(set_to_none=True)
            _loss.clear()
            with torch.set_grad_enabled(self._training):
                out = self._model(*chunk)
            if self._training:
                if len(_loss) != 1:
                    raise Error("Couldn't find a loss in graph!" if not _loss else "Multiple independent losses "
                                "found in graph. Wrap final graph loss in poptorch.identity_loss.")
                mean = self._options.Training.accumulation_and_replication_reduction_type == ReductionType.Mean
                ls = getattr(self._optimizer, "loss_scaling", 1.0)
                (_loss[0].sum() * ls / (g * r if mean else 1)).backward()
                if k % (g * r) == g * r - 1:        # the last micro-batch of this device iteration
                    params = [p for grp in self._optimizer.param_groups for p in grp["params"] if p.grad is not None]
                    self._all_reduce_grads(params)
                    for p in params:
                        p.grad.div_(ls)             # unscale before the update
                    if getattr(self._optimizer, "max_grad_norm", float("inf")) != float("inf"):
                        torch.nn.utils.clip_grad_norm_(params, self._optimizer.max_grad_norm)
                    self._optimizer.step()
            outs.append(out if isinstance(out, tuple) else (out,))
        res = tuple(self._reduce([o[i].detach() for o in outs], d * g, r) for i in range(len(outs[0])))
        return res if isinstance(out, tuple) else res[0]

    def _reduce(self, vals, n, r):
        """vals in [D*G, R] order -> the outputMode's shape."""
        mode = self._options.output_mode
        if mode == OutputMode.Default:
            mode = OutputMode.Final if self._training else OutputMode.All
        join = torch.stack if vals[0].dim() == 0 else torch.cat
        if mode == OutputMode.All:
            return join(vals)
        if mode == OutputMode.EveryN:
            p = self._options.output_return_period
            return join([v for k, v in enumerate(vals) if (k // r + 1) % p == 0])
        per_rep = [vals[k::r] for k in range(r)]
        sel = [sum(v) if mode == OutputMode.Sum else v[-1] for v in per_rep]
        return sel[0] if r == 1 else join(sel)


def _wrap(model, options, optimizer, training):
    options = options or Options()
    if training and model.__dict__.get("_poptorch_wrapped"):
        raise Error("Model has already been wrapped in 'poptorch.trainingModel'. Call destroy() first.")
    if not training and options.Training.gradient_accumulation != 1:
        raise Error("You must set poptorch.Options().Training.gradientAccumulation to 1 or leave it as its "
                    "default value (1) when running a poptorch.inferenceModel().")
    options._freeze()
    if training:
        model.__dict__["_poptorch_wrapped"] = True
    return PoplarExecutor(model, options, optimizer, training)


def trainingModel(model, options=None, optimizer=None):
    return _wrap(model, options, optimizer or optim.SGD(model.parameters(), lr=0.01), True)


def inferenceModel(model, options=None):
    return _wrap(model, options, None, False)


class DataLoader(torch.utils.data.DataLoader):
    def __init__(self, options, dataset, batch_size=1, shuffle=None, num_workers=0, drop_last=True,
                 persistent_workers=None, auto_distributed_partitioning=True, mode=DataLoaderMode.Sync,
                 async_options=None, rebatched_worker_size=None, batch_sampler=None, **kwargs):
        if async_options and "rebatched_size" in async_options:
            raise Error("rebatched_size is not allowed in async_options")
        self.combinedBatchSize = (batch_size * options.device_iterations * options.replication_factor
                                  * options.Training.gradient_accumulation)
        options._freeze()
        self._options, self.mode, self.async_options = options, mode, async_options
        n, i = options.Distributed.numProcesses, options.Distributed.processId
        if n > 1 and auto_distributed_partitioning and not isinstance(dataset, torch.utils.data.IterableDataset):
            dataset = torch.utils.data.Subset(dataset, range(i, len(dataset), n))   # this process's slice
        super().__init__(dataset, batch_size=self.combinedBatchSize, shuffle=bool(shuffle), num_workers=num_workers,
                         drop_last=drop_last, **kwargs)

    @property
    def options(self):
        return self._options

    def terminate(self):
        pass
