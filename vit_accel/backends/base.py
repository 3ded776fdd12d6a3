"""The backend seam: what a device must do for the shared trainer, and nothing else.

A backend tells whether it is available, chooses the model's ops, places and wraps the model
and optimizer, runs one call of optimizer steps on the batch this process feeds, evaluates a
batch, and saves/loads its state. The trainer loop, schedule, metrics, logging and checkpoint
policy live in ``vit_accel.engine`` and are written once.

Batch granularity is the backend's: one ``train_step`` consumes ``batch_per_call`` images of
this process and performs ``steps_per_call`` optimizer steps (IPU: micro-batch x gradient
accumulation x local replicas x device iterations; elsewhere micro-batch x accumulation, one
step). Python 3.8 / torch 2.0 compatible: the IPU path imports this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..config import Recipe


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what is missing and what to do."""


@dataclass
class StepResult:
    loss: float                      # mean training loss over the images of the call
    grad_norm: Optional[float] = None
    skipped: bool = False            # fp16 overflow: the step was skipped by the loss scaler


class Backend:
    name = "base"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.model: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # -- availability ------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None when the backend can run here, else one line: what is missing, what to do."""
        return None

    # -- model -------------------------------------------------------------------------
    def model_options(self) -> Dict[str, Any]:
        """Op choices passed to ``create_vit`` (same parameters whatever they are)."""
        return {"attn_impl": "sdpa", "norm_impl": "torch", "mlp_impl": "torch"}

    def setup(self, model: torch.nn.Module) -> None:
        """Place the model, build the optimizer from the recipe, wrap both."""
        raise NotImplementedError

    # -- batch granularity ---------------------------------------------------------------
    @property
    def micro_batch_size(self) -> int:
        raise NotImplementedError

    @property
    def gradient_accumulation(self) -> int:
        raise NotImplementedError

    @property
    def steps_per_call(self) -> int:
        return 1

    @property
    def batch_per_call(self) -> int:
        """Images this process feeds to one ``train_step``."""
        return self.micro_batch_size * self.gradient_accumulation * self.steps_per_call

    @property
    def eval_batch_size(self) -> int:
        return self.recipe.train.eval_batch_size or self.micro_batch_size

    # -- steps -------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        """Run ``steps_per_call`` optimizer steps at learning rate ``lr``.

        ``images`` are uint8 [B, 3, H, W] straight from the loader; ``labels`` are int64 [B]
        class indices or float [B, classes] soft targets (mixup/cutmix).
        """
        raise NotImplementedError

    def eval_step(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on the CPU) for a uint8 batch of any size up to ``eval_batch_size``."""
        raise NotImplementedError

    # -- distribution helpers -------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small CPU tensor over processes (metrics); identity for one process."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            dev = self.collective_device()
            x = t.to(dev)
            torch.distributed.all_reduce(x)
            return x.cpu()
        return t

    def collective_device(self) -> torch.device:
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        """Release devices and process groups."""

    # -- state ---------------------------------------------------------------------------
    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full fp32 model weights with timm keys, on the CPU (collective where sharded)."""
        assert self.model is not None
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in unwrap(self.model).state_dict().items()}

    def optimizer_state_dict(self) -> Dict[str, Any]:
        assert self.optimizer is not None
        return self.optimizer.state_dict()

    def load_model_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        unwrap(self.model).load_state_dict(sd)

    def load_optimizer_state_dict(self, sd: Dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.optimizer.load_state_dict(sd)

    def save_state(self, path: Path, extra: Dict[str, Any]) -> Path:
        """Write a resumable checkpoint atomically (temp file + rename); returns its path.

        The file holds the model, the optimizer and whatever the trainer puts in ``extra``
        (step, schedule, RNG states, data position, recipe). Collective: every rank calls it.
        """
        model_sd = self.model_state_dict()
        optim_sd = self.optimizer_state_dict()
        if self.is_main:
            payload = dict(extra)
            payload.update({"format": "vit-accel-train", "model": model_sd, "optimizer": optim_sd,
                            "backend": self.name})
            atomic_save(payload, path)
        self.barrier()
        return path

    def load_state(self, path: Path, trust: bool = False) -> Dict[str, Any]:
        """Read a checkpoint written by ``save_state``; restores model and optimizer, returns it.

        Only tensors and plain types are read (``trust=True``: the full unpickler, for an older
        file the user vouches for).
        """
        from ..checkpoints.files import load_plain

        payload = load_plain(str(path), trust=trust)
        if not isinstance(payload, dict) or payload.get("format") != "vit-accel-train":
            from ..checkpoints.files import CheckpointError

            raise CheckpointError(f"{path}: not a vit-accel training checkpoint (no format 'vit-accel-train'); "
                                  f"to start from its weights use --set model.pretrained={path}")
        self.load_model_state_dict(payload["model"])
        if payload.get("optimizer") is not None and payload.get("backend", self.name) == self.name:
            self.load_optimizer_state_dict(payload["optimizer"])
        return payload


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare ViT inside DDP / DeepSpeed / torch.compile / PopTorch wrappers."""
    for attr in ("module", "_orig_mod", "model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module) and inner is not model:
            return unwrap(inner)
    return model


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
