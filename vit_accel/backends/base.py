"""The backend seam: what a device must do for the shared trainer, and nothing else.

A backend tells whether it is available, chooses the model's ops, places and wraps the model
and optimizer, feeds and runs one call of optimizer steps on the batch this process reads,
evaluates a batch, and saves/loads its state. The trainer loop, schedule, metrics, logging,
checkpoint policy and the process-group queries (``engine.distributed``) are written once,
outside the backends.

Batch granularity is the backend's: one ``train_step`` consumes ``batch_per_call`` images of
this process and performs ``steps_per_call`` optimizer steps (IPU: micro-batch x gradient
accumulation x local replicas x device iterations; elsewhere micro-batch x accumulation, one
step). Python 3.8 / torch 2.0 compatible: the IPU path imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from ..config import Recipe
from ..engine import distributed
from ..engine.saving import current_writer
from ..model import PORTABLE_OPS, unwrap


@dataclass
class StepResult:
    loss: float                      # mean training loss over the images of the call
    grad_norm: Optional[float] = None
    skipped: bool = False            # fp16 overflow: the step was skipped by the loss scaler


class Backend:
    """What the trainer, ``vit-accel eval`` and ``vit-accel bench`` call; a new backend implements
    ``setup``, ``batch_per_call``, ``eval_batch_size``, ``train_step``, ``eval_step``, ``save_state`` and
    ``load_state``, and overrides the rest where its device needs it."""

    name = "base"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe   # read by the backend itself (its section, batch, optimizer, distributed settings)
        self.model: Optional[torch.nn.Module] = None   # after setup: the model that trains (EMA follows it)

    # Asked of the class, before any backend is built: `--backend auto` picks the first that can
    # run, and an unavailable one exits 2 with this line (backends.resolve_backend).
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None when the backend can run here, else one line: what is missing, what to do."""
        return None

    def model_options(self) -> Dict[str, Any]:
        """Op choices passed to ``create_vit`` (same parameters whatever they are)."""
        return dict(PORTABLE_OPS)

    def setup(self, model: torch.nn.Module) -> None:
        """Place the model, build the optimizer from the recipe, wrap both."""
        raise NotImplementedError

    # -- batch granularity ---------------------------------------------------------------
    @property
    def batch_per_call(self) -> int:
        """Images this process feeds to one ``train_step``."""
        raise NotImplementedError

    @property
    def steps_per_call(self) -> int:
        """Optimizer steps one ``train_step`` performs."""
        return 1

    @property
    def eval_batch_size(self) -> int:
        """Images of one ``eval_step`` call at most."""
        raise NotImplementedError

    # -- steps -------------------------------------------------------------------------
    def wrap_train_loader(self, loader: Iterable) -> Iterable:
        """The training batches as ``train_step`` wants them; a feed that reads ahead must keep the
        loader's ``state_dict`` / ``load_state_dict`` (the position of the batches it handed out)."""
        return loader

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        """Run ``steps_per_call`` optimizer steps at learning rate ``lr``.

        ``images`` are uint8 [B, 3, H, W] straight from the loader; ``labels`` are int64 [B]
        class indices or float [B, classes] soft targets (mixup/cutmix).
        """
        raise NotImplementedError

    def eval_step(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on the CPU) for a uint8 batch of any size up to ``eval_batch_size``."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------
    def save_state(self, path: Path, extra: Dict[str, Any]) -> Path:
        """Write a resumable checkpoint atomically; returns its path. Collective: every rank calls it.

        The file holds the model, the optimizer and whatever the trainer puts in ``extra``
        (step, schedule, RNG states, data position, recipe).
        """
        raise NotImplementedError

    def load_state(self, path: Path, trust: bool = False) -> Dict[str, Any]:
        """Restore model and optimizer from a ``save_state`` checkpoint; returns its contents (``extra``).

        The file is read by the strict unpickler without stand-ins (tensors, containers, numpy
        data; ``checkpoints/unpickle.py``); ``trust=True`` is the full unpickler, for a file the
        user vouches for.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release devices and process groups. The group is left here, not at interpreter exit,
        where a gloo thread still freeing a collective's tensors can abort a process whose run
        succeeded (SIGABRT; see ``engine.distributed.end_process``)."""
        distributed.leave_process_group()


# ---------------------------------------------------------------------------------------
# The checkpoint file every backend but ZeRO writes (ZeRO adds DeepSpeed's directory)
# ---------------------------------------------------------------------------------------

def full_weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Full fp32 model weights with timm keys, on the CPU."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in unwrap(model).state_dict().items()}


def write_checkpoint(path: Path, weights: Dict[str, torch.Tensor], optimizer_state: Optional[Dict[str, Any]],
                     extra: Dict[str, Any], backend_name: str) -> Path:
    """The main process writes ``extra`` + weights + optimizer state (format ``vit-accel-train``)
    atomically, at once or from a host snapshot in the background (``engine.saving``); every
    process waits for it (for the snapshot, when asynchronous)."""
    if distributed.is_main():
        payload = dict(extra)
        payload.update({"format": "vit-accel-train", "model": weights, "optimizer": optimizer_state,
                        "backend": backend_name})
        current_writer().write(payload, path)
    distributed.barrier()
    return path


def read_checkpoint(path: Path, trust: bool, backend_name: str) -> Dict[str, Any]:
    """A ``vit-accel-train`` checkpoint's contents; ``optimizer`` is None unless ``backend_name`` wrote it
    (another backend's optimizer state does not fit this one's)."""
    from ..checkpoints.files import CheckpointError, load_plain

    payload = load_plain(str(path), trust=trust)
    if not isinstance(payload, dict) or payload.get("format") != "vit-accel-train":
        raise CheckpointError(f"{path}: not a vit-accel training checkpoint (no format 'vit-accel-train'); "
                              f"to start from its weights use --set model.pretrained={path}")
    if payload.get("backend", backend_name) != backend_name:
        payload["optimizer"] = None
    return payload
