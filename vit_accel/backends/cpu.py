"""CPU backend: the reference path, and the base of the GPU backend (same loop, other device).

One ``train_step`` = one optimizer step over ``micro_batch_size x gradient_accumulation``
images of this process. Several processes (``torchrun``) run data parallel: plain DDP when
``distributed.zero_stage`` is -1, DeepSpeed ZeRO (gloo on CPU) when it is 0..3.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from ..config import batch_split
from ..data.transforms import normalize
from ..engine.optim import build_optimizer, set_lr
from .base import Backend, StepResult


class CPUBackend(Backend):
    name = "cpu"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.device = self.select_device()
        self.strategy: Optional[Any] = None   # DeepSpeed engine wrapper when zero_stage >= 0
        self.ddp: Optional[torch.nn.Module] = None
        self.init_distributed()
        sec, g = self.section, recipe.train.global_batch_size
        self._micro, self._accum = batch_split(g, sec.micro_batch_size, self.world_size,
                                               sec.gradient_accumulation, self.name)
        if self.is_main:
            print(f"batch: global {g} = micro-batch {self._micro} x accumulation {self._accum} x "
                  f"{self.world_size} process(es) ({self.name}.micro_batch_size {sec.micro_batch_size} "
                  f"is the upper bound)", flush=True)

    # -- setup ----------------------------------------------------------------------------
    @property
    def section(self):
        return getattr(self.recipe, self.name)

    def select_device(self) -> torch.device:
        if self.recipe.cpu.threads:
            torch.set_num_threads(self.recipe.cpu.threads)
        return torch.device("cpu")

    def dist_backend(self) -> str:
        b = self.recipe.distributed.dist_backend
        return "gloo" if b == "auto" else b

    def init_distributed(self) -> None:
        """Join the process group that torchrun / the deepspeed launcher describes, if any."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend=self.dist_backend())
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def setup(self, model: torch.nn.Module) -> None:
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, self.recipe.optim)
        if self.recipe.distributed.zero_stage >= 0:
            from .zero import DeepSpeedStrategy

            self.strategy = DeepSpeedStrategy(self)
        elif self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)

    # -- batch granularity ----------------------------------------------------------------
    @property
    def micro_batch_size(self) -> int:
        """The micro-batch in use: the largest that divides this process's share, up to the recipe's."""
        return self._micro

    @property
    def gradient_accumulation(self) -> int:
        return self._accum

    # -- steps ----------------------------------------------------------------------------
    def autocast(self):
        if self.section.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] on the host -> normalized float32 on the device (4x fewer bytes moved)."""
        return normalize(images.to(self.device, non_blocking=True), self.recipe.data.mean, self.recipe.data.std)

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """optim.loss "ce": F.cross_entropy; "soft_ce": mean over samples of -sum(target x log_softmax)
        (ClassyVision's and timm's SoftTargetCrossEntropy), class indices made one-hot first."""
        # soft targets (mixup/cutmix) already carry the label smoothing
        smoothing = 0.0 if target.is_floating_point() else self.recipe.optim.label_smoothing
        if self.recipe.optim.loss == "soft_ce":
            if not target.is_floating_point():
                classes = logits.shape[1]
                target = F.one_hot(target, classes).float() * (1.0 - smoothing) + smoothing / classes
            return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        if self.strategy is not None:
            return self.strategy.train_step(images, labels, lr)
        model = self.ddp if self.ddp is not None else self.model
        model.train()
        set_lr(self.optimizer, lr)
        accum, mb = self.gradient_accumulation, self.micro_batch_size
        total = 0.0
        for i in range(accum):
            x = self.prepare(images[i * mb:(i + 1) * mb])
            y = labels[i * mb:(i + 1) * mb].to(self.device, non_blocking=True)
            # DDP all-reduces only on the last micro-batch of the step
            sync = self.ddp.no_sync() if (self.ddp is not None and i < accum - 1) else nullcontext()
            with sync:
                with self.autocast():
                    logits = model(x)
                loss = self.loss_fn(logits, y) / accum
                loss.backward()
            total += loss.detach()
        grad_norm = None
        if self.recipe.optim.clip_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             self.recipe.optim.clip_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=float(total), grad_norm=grad_norm)

    @torch.no_grad()
    def eval_step(self, images: torch.Tensor) -> torch.Tensor:
        model = self.strategy.module if self.strategy is not None else self.model
        model.eval()
        with self.autocast():
            logits = model(self.prepare(images))
        return logits.float().cpu()

    # -- state ----------------------------------------------------------------------------
    def save_state(self, path, extra: Dict[str, Any]):
        if self.strategy is not None:
            return self.strategy.save_state(path, extra)
        return super().save_state(path, extra)

    def load_state(self, path, trust: bool = False) -> Dict[str, Any]:
        if self.strategy is not None:
            return self.strategy.load_state(path)   # DeepSpeed's own files, read by DeepSpeed
        return super().load_state(path, trust=trust)

    def model_state_dict(self):
        if self.strategy is not None:
            return self.strategy.model_state_dict()
        return super().model_state_dict()
