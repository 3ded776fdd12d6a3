"""DeepSpeed ZeRO behind the CPU and GPU backends: recipe -> DeepSpeed config, the step loop,
checkpoints and the consolidated fp32 weights.

``CPUBackend.setup`` builds the model and our optimizer (parameter groups from the recipe), then
hands both to :class:`DeepSpeedStrategy` when ``distributed.zero_stage`` is 0..3. DeepSpeed owns
gradient averaging, accumulation, clipping, 16-bit weights with fp32 masters, and the sharding
of optimizer state (stage 1), gradients (2) and parameters (3). The trainer still owns the
schedule: it passes ``lr`` to every ``train_step`` and we write it into the optimizer's groups;
DeepSpeed gets no scheduler and no optimizer section of its own.

The same code runs on CPU processes (gloo; fp32 or bf16) so CI trains it for real::

    torchrun --nproc_per_node 2 -m vit_accel train --backend cpu --config vit-ti-digits \\
        --set distributed.zero_stage=3

Checkpoint layout (``save_state(run_dir/checkpoints/step_0000100.pt, extra)``)::

    step_0000100.pt    consolidated fp32 weights and the optimizer state as full tensors in the plain
                       optimizer's layout (zero_state.py), our ``vit-accel-train`` format:
                       ``vit-accel eval --checkpoint``, ``convert`` and ``predict`` read it anywhere.
    step_0000100.ds/   ``engine.save_checkpoint`` (sharded model + optimizer state per rank, the
                       trainer's ``extra`` as client state, DeepSpeed's ``zero_to_fp32.py``); not
                       written by an asynchronous save (``train.async_checkpoint``).
    step_0000100.done  written last by the trainer once every part is on disk (engine/saving.py).

``load_state`` takes the ``.pt`` path. On the world size and ZeRO stage that wrote it, DeepSpeed
resumes from the ``.ds`` directory beside it; on another world size or stage (or with no ``.ds``)
the full state in the ``.pt`` is loaded into this run's partitions.

deepspeed is imported here only, and this module only when a recipe asks for ZeRO.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Dict

import torch

from ..config import ConfigError, Recipe, batch_split
from ..engine import distributed
from ..engine.optim import set_lr
from ..engine.saving import current_writer, fsync_tree, read_marker
from ..model import unwrap
from .base import StepResult, read_checkpoint, write_checkpoint
from .zero_state import full_optimizer_state, load_full_state, record_groups

# DeepSpeed prints its own progress every `steps_per_print` steps; the trainer logs instead.
_NEVER = 2 ** 31 - 1

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------
# Recipe -> DeepSpeed config
# ---------------------------------------------------------------------------------------

def deepspeed_config(recipe: Recipe, world_size: int, micro_batch_size: int, precision: str,
                     gradient_accumulation_steps: int = 0) -> Dict[str, Any]:
    """The DeepSpeed config dict for ``recipe`` on ``world_size`` data-parallel processes.

    ``micro_batch_size`` is an upper bound and ``gradient_accumulation_steps`` 0 derives the split
    from the global batch (``config.batch_split``); a requested value must reach
    ``train.global_batch_size`` (ConfigError otherwise).
    """
    dist = recipe.distributed
    if dist.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage {dist.zero_stage}: DeepSpeed needs a ZeRO stage 0..3 "
                          "(-1 means plain data parallel without DeepSpeed)")
    if precision not in _DTYPES:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(_DTYPES)}")
    if dist.offload_optimizer and dist.zero_stage == 0:
        raise ConfigError("distributed.offload_optimizer needs ZeRO stage 1, 2 or 3 "
                          "(stage 0 keeps a full optimizer on every process); set distributed.zero_stage")
    global_batch = recipe.train.global_batch_size
    micro_batch_size, accum = batch_split(global_batch, micro_batch_size, world_size, gradient_accumulation_steps)
    zero: Dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg: Dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(recipe.optim.clip_grad_norm),   # 0.0 = no clipping, as ours
        "zero_optimization": zero,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        # Our client optimizer may be torch SGD, which DeepSpeed does not list as "ZeRO-tested";
        # ZeRO shards flat fp32 buffers and SGD's update is element-wise, so sharding is exact.
        "zero_allow_untested_optimizer": True,
    }
    if dist.offload_optimizer:
        # Offload with a torch.optim optimizer is slower than DeepSpeedCPUAdam but keeps our
        # parameter groups and SGD; DeepSpeed refuses it unless told this is deliberate.
        cfg["zero_force_ds_cpu_optimizer"] = False
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        # loss_scale 0 = dynamic loss scaling, starting at 2**16 and halving on overflow
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                       "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return cfg


# ---------------------------------------------------------------------------------------
# The strategy the CPU/GPU backends delegate to
# ---------------------------------------------------------------------------------------

class _EvalView(torch.nn.Module):
    """The model as evaluation sees it: float32 images in, through the DeepSpeed engine.

    Going through the engine (not the bare module) casts the images to the 16-bit weights, and
    under ZeRO-3 marks the forward pass so parameters used outside their own module's forward
    (our fused MLP reads ``fc1.weight`` directly) are gathered too.
    """

    def __init__(self, engine, dtype: torch.dtype):
        super().__init__()
        self.module = engine          # named so model.unwrap() finds the ViT inside
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype))


class DeepSpeedStrategy:
    """DeepSpeed engine around ``backend.model`` and ``backend.optimizer`` (built by the backend)."""

    def __init__(self, backend):
        if backend.device.type == "cpu":
            # A CUDA build of torch on a CPU run (or a host without GPUs) must not get the CUDA
            # accelerator: DeepSpeed decides once, at its first import, from this variable.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.backend = backend
        self.precision = backend.precision.precision   # resolved (cpu.precision may say "auto")
        if self.precision == "fp16" and backend.device.type != "cuda":
            raise ConfigError("fp16 with DeepSpeed needs a CUDA device (DeepSpeed refuses fp16 on CPU); "
                              "use precision bf16 or fp32")
        self.dtype = _DTYPES[self.precision]
        self.config = deepspeed_config(backend.recipe, distributed.world_size(), backend.micro_batch_size,
                                       self.precision, backend.gradient_accumulation)
        _quiet(deepspeed)
        _init_process_group(deepspeed, backend.dist_backend())
        self.groups = record_groups(backend.optimizer)     # before DeepSpeed flattens them
        self.engine, _, _, _ = deepspeed.initialize(model=backend.model, optimizer=backend.optimizer,
                                                    config=self.config)
        if self.engine.gradient_accumulation_steps() != backend.gradient_accumulation:
            raise ConfigError(f"DeepSpeed accumulates {self.engine.gradient_accumulation_steps()} micro-batches "
                              f"but the backend feeds {backend.gradient_accumulation}")
        self._eval_view = _EvalView(self.engine, self.dtype)

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    @property
    def module(self) -> torch.nn.Module:
        """The model for evaluation; takes float32 images whatever the weights' precision.

        Under ZeRO-3 its forward gathers parameters from every rank: all ranks must call it
        the same number of times.
        """
        return self._eval_view

    # -- steps ----------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        b, engine = self.backend, self.engine
        accum, mb = b.gradient_accumulation, b.micro_batch_size
        if images.shape[0] != accum * mb:
            raise ValueError(f"train_step got {images.shape[0]} images; DeepSpeed expects micro_batch_size {mb} x "
                             f"gradient_accumulation {accum} = {accum * mb} per process")
        engine.train()
        set_lr(engine.optimizer, lr)
        total = torch.zeros((), device=b.device)      # summed on the device: one sync per step
        for x, y in b.micro_batches(images, labels):
            loss = b.loss_fn(engine(x.to(self.dtype)), y)
            # The unscaled micro-batch mean: engine.backward divides by the accumulation
            # steps itself (scale_wrt_gas), so dividing here too would shrink the gradient.
            engine.backward(loss)
            # A no-op except at the accumulation boundary, where DeepSpeed averages over
            # processes, clips, and applies the update.
            engine.step()
            total += loss.detach().float()
        norm = engine.get_global_grad_norm()
        return StepResult(loss=float(total / accum),
                          grad_norm=float(norm) if norm is not None and norm >= 0 else None,
                          skipped=not engine.was_step_applied())

    # -- weights --------------------------------------------------------------------------
    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full fp32 weights with timm keys on the CPU, on every rank (collective).

        Parameters come from DeepSpeed's fp32 master copy (sharded under ZeRO 1..3), not from
        the 16-bit working weights, so a bf16 run's checkpoint loses no precision.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        masters = _fp16_wrapper_masters(self.engine.optimizer)
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        out: Dict[str, torch.Tensor] = {}
        # state_dict() keys give timm's order; under ZeRO-3 its tensors are empty shards, so the
        # values come from the parameters themselves, gathered in the same order on every rank.
        for name in module.state_dict().keys():
            if name in params:
                p = params[name]
                full = safe_get_full_fp32_param(p)   # ZeRO 1..3 and bf16 optimizer: collective
                if full is None:
                    full = masters.get(id(p), p)     # stage 0: fp16/bf16 wrapper master, or p in fp32
                out[name] = full.detach().float().cpu().clone()
            elif name in buffers:
                t = buffers[name].detach()
                out[name] = (t.float() if t.is_floating_point() else t).cpu().clone()
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def save_state(self, path, extra: Dict[str, Any]) -> Path:
        """Write ``PATH.ds/`` (DeepSpeed's shards; not when saving asynchronously) then ``PATH``
        (full fp32 weights and optimizer state); collective."""
        b = self.backend
        path = Path(path)
        ds_dir = deepspeed_dir(path)
        if distributed.is_main() and ds_dir.exists():
            shutil.rmtree(ds_dir)            # a half-written attempt at this step
        distributed.barrier()
        tag = path.stem
        shards = not current_writer().asynchronous
        if shards:
            self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state=dict(extra), save_latest=True)
            fsync_tree(ds_dir)               # DeepSpeed does not; the marker must not outrun the shards
        extra = dict(extra, deepspeed={"dir": ds_dir.name if shards else None, "tag": tag,
                                       "zero_stage": self.zero_stage, "world_size": distributed.world_size()})
        if "vit_config" not in extra:
            extra["vit_config"] = unwrap(self.engine.module).cfg.portable_dict()
        optimizer = full_optimizer_state(self.engine, self.groups)
        return write_checkpoint(path, self.model_state_dict(), optimizer, extra, b.name)

    def load_state(self, path, trust: bool = False) -> Dict[str, Any]:
        """Resume model, optimizer and loss scale; returns the saved ``extra``.

        DeepSpeed's own shards when this run has the checkpoint's world size and stage, else the
        full state of ``PATH`` (another number of processes, another stage, plain data parallel).
        DeepSpeed reads its shards with the full unpickler: they are checked first
        (``check_deepspeed_checkpoint``) unless ``trust`` (``--trust-checkpoint``); the full state
        is read by the strict reader.
        """
        path = Path(path)
        ds_dir = path if path.is_dir() else deepspeed_dir(path)
        meta = read_marker(path) if not path.is_dir() else None
        if meta is None:
            meta = {"world_size": _saved_world_size(ds_dir), "zero_stage": self.zero_stage}
        layout = (distributed.world_size(), self.zero_stage)
        if ds_dir.is_dir() and (meta.get("world_size"), meta.get("zero_stage")) == layout:
            return self._load_shards(ds_dir, trust)
        return self._load_full(path, trust, meta)

    def _load_shards(self, ds_dir: Path, trust: bool) -> Dict[str, Any]:
        if not trust:
            check_deepspeed_checkpoint(ds_dir)
        load_path, client = self.engine.load_checkpoint(str(ds_dir), tag=None, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
        if load_path is None:
            raise ConfigError(f"{ds_dir}: DeepSpeed found no checkpoint there (no 'latest' tag file)")
        return dict(client or {})

    def _load_full(self, path: Path, trust: bool, meta) -> Dict[str, Any]:
        if not path.is_file():
            raise ConfigError(f"{path}: no such checkpoint file")
        payload = read_checkpoint(path, trust, self.backend.name)
        load_full_state(self.engine, self.engine.module, payload["model"], payload.get("optimizer") or {}, self.groups)
        if distributed.is_main():
            was = (meta or {}).get("world_size") or (payload.get("deepspeed") or {}).get("world_size")
            print(f"{path.name}: full state loaded into ZeRO stage {self.zero_stage} on {distributed.world_size()} "
                  f"process(es) (written on {was or '?'})"
                  + ("" if payload.get("optimizer") else "; it has no optimizer state for this backend: the "
                     "optimizer starts afresh"), flush=True)
        return payload


def _saved_world_size(ds_dir: Path):
    """The number of processes that wrote DeepSpeed's shards (one optimizer file each), or None."""
    try:
        tag = (ds_dir / "latest").read_text().strip()
    except OSError:
        return None
    return len(list((ds_dir / tag).glob("*optim_states.pt"))) or None


# The objects of DeepSpeed's own classes in its ZeRO checkpoints (0.19.8, stages 0-3, fp32, bf16
# and fp16): the optimizer state's loss scaler, the ZeRO stage as an enum, and each parameter's
# fragment address. Two ways to keep DeepSpeed's full unpickler from running foreign code were
# open: keep these objects out of the files, or allow exactly these pairs. Keeping them out means
# rewriting DeepSpeed's optimizer state format, which its loader reads back as objects (it calls
# the loss scaler's methods), for every stage and version. Allowing them is narrow: building any
# of them runs no code beyond setting attributes and an enum lookup, the check below builds them
# as inert stand-ins (it never imports DeepSpeed classes), and every other global stays refused.
DEEPSPEED_OBJECTS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                     ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                     ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                     ("deepspeed.utils.tensor_fragment", "fragment_address"))
# Scripts DeepSpeed copies beside its checkpoint for users (consolidating by hand); loading never
# reads or runs them.
_DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def check_deepspeed_checkpoint(ds_dir: Path) -> None:
    """Before DeepSpeed (whose loader is the full unpickler) touches ``ds_dir``: its ``latest`` tag
    names a folder inside it, and every other file reads with the strict unpickler (tensors, plain
    types and ``DEEPSPEED_OBJECTS``, as inert stand-ins; no tensor data is read). A file that needs
    more is refused, naming it: ``--trust-checkpoint`` skips this check."""
    from ..checkpoints.files import CheckpointError, load_torch

    ds_dir = Path(ds_dir)
    trust = ("resume a ZeRO checkpoint you wrote yourself with --trust-checkpoint, which lets DeepSpeed read it "
             "with the full unpickler (it runs whatever code the files name)")
    latest = ds_dir / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if not re.fullmatch(r"[\w.-]+", tag) or tag in (".", "..") or not (ds_dir / tag).is_dir():
            raise CheckpointError(f"{latest}: refused: it names {tag[:80]!r}, not a checkpoint folder inside "
                                  f"{ds_dir} (DeepSpeed would read the files it points at); {trust}")
    for f in _files_under(ds_dir):
        if f == latest or (f.parent == ds_dir and f.name in _DEEPSPEED_SCRIPTS):
            continue
        load_torch(f, standins=DEEPSPEED_OBJECTS, map_location="meta", hint=trust)


def _files_under(root: Path):
    """Every file below ``root``, through linked folders as DeepSpeed would open them (each folder once)."""
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            yield Path(folder) / name


def deepspeed_dir(path: Path) -> Path:
    """The DeepSpeed directory that goes with checkpoint file ``path`` (``step_N.pt`` -> ``step_N.ds``)."""
    return Path(path).with_suffix(".ds")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def _fp16_wrapper_masters(optimizer) -> Dict[int, torch.Tensor]:
    """id(16-bit param) -> fp32 master for DeepSpeed's stage-0 fp16/bf16 wrapper (else empty).

    ZeRO 1..3 expose masters through ``safe_get_full_fp32_param``; the stage-0 wrappers keep
    them as lists parallel to the 16-bit groups.
    """
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not low or not high or len(low) != len(high):
        return {}
    out = {}
    for lg, hg in zip(low, high):
        if isinstance(hg, torch.Tensor) or len(lg) != len(hg):
            return {}                         # the fused wrapper keeps flat buffers: no map
        for lp, hp in zip(lg, hg):
            out[id(lp)] = hp
    return out


def _init_process_group(deepspeed, backend: str) -> None:
    """Join (or, for one process without a launcher, create) the group DeepSpeed will use.

    Without torchrun's variables DeepSpeed tries MPI discovery; a lone process gets the
    single-rank defaults instead (a free local port).
    """
    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(deepspeed) -> None:
    """DeepSpeed logs its whole config at INFO on every rank; keep its warnings, drop the rest.

    ``VIT_ACCEL_DEEPSPEED_LOGS=1`` keeps DeepSpeed's INFO lines (for debugging its setup).
    """
    if os.environ.get("VIT_ACCEL_DEEPSPEED_LOGS", "0") != "1":
        deepspeed.utils.logger.setLevel(logging.WARNING)


__all__ = ["DeepSpeedStrategy", "check_deepspeed_checkpoint", "deepspeed_config", "deepspeed_dir"]
