"""GPU backend: the CPU loop on a CUDA device, with our Triton kernels, bf16/fp16 and NCCL.

One process per GPU (``torchrun`` / the ``deepspeed`` launcher set ``LOCAL_RANK``). Defaults
from the recipe's ``gpu`` section: bf16 autocast, the Triton attention / LayerNorm / bias-GELU
kernels (``gpu.attn_impl``, ``gpu.norm_impl``, ``gpu.mlp_impl``, switchable one by one), optional
``torch.compile`` (``gpu.compile``). fp16 uses dynamic loss scaling: ``torch.amp.GradScaler``
in the plain loop, DeepSpeed's ``fp16`` section (loss_scale 0) under ZeRO
(``distributed.zero_stage`` 0..3, see zero.py).

Importing this module imports neither triton nor deepspeed: the model imports the kernels when
built with a "triton" op, zero.py imports deepspeed when a recipe asks for ZeRO.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch

from ..config import Recipe
from ..engine.optim import set_lr
from .base import BackendUnavailable, StepResult
from .cpu import CPUBackend

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_model_options(recipe: Recipe) -> Dict[str, Any]:
    """The op choices of the recipe's ``gpu`` section, as ``create_vit`` keywords."""
    g = recipe.gpu
    return {"attn_impl": g.attn_impl, "norm_impl": g.norm_impl, "mlp_impl": g.mlp_impl}


def cuda_unavailable_reason() -> Optional[str]:
    """None when torch sees a CUDA device, else one line: what is missing and what to do."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        missing = f"this torch {torch.__version__} is a CPU-only build"
    else:
        missing = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no NVIDIA GPU"
    return (f"needs a CUDA build of torch and an NVIDIA GPU; {missing}. "
            "Use --backend cpu, or install torch with CUDA on a machine with a GPU")


class GPUBackend(CPUBackend):
    name = "gpu"

    def __init__(self, recipe: Recipe):
        self.scaler: Optional[torch.amp.GradScaler] = None
        super().__init__(recipe)

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        return cuda_unavailable_reason()

    def model_options(self) -> Dict[str, Any]:
        return gpu_model_options(self.recipe)

    # -- placement and process group --------------------------------------------------------
    def select_device(self) -> torch.device:
        reason = cuda_unavailable_reason()
        if reason:
            raise BackendUnavailable(f"--backend gpu: {reason}")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise BackendUnavailable(f"LOCAL_RANK {local_rank} but this node has {count} visible GPU(s); "
                                     "launch at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        # fp32 matmuls (the fp32 recipe, and fp32 islands under autocast) may use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local_rank)

    def dist_backend(self) -> str:
        b = self.recipe.distributed.dist_backend
        return "nccl" if b == "auto" else b

    def collective_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo (if chosen) takes either
        return self.device

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # -- model and optimizer ----------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> None:
        super().setup(model)   # places the model, builds our optimizer, wraps DDP or DeepSpeed
        if self.strategy is None and self.section.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        if self.section.compile:
            if self.strategy is not None:
                # DeepSpeed compiles the module inside its engine (its hooks stay outside the graph)
                self.strategy.engine.compile()
            elif self.ddp is not None:
                self.ddp = torch.compile(self.ddp)
            else:
                self.model = torch.compile(self.model)

    def autocast(self):
        dtype = _AUTOCAST.get(self.section.precision)
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # -- state: the loss scale travels with the checkpoint (exact fp16 resume) ---------------------
    def save_state(self, path, extra: Dict[str, Any]):
        if self.scaler is not None:
            extra = dict(extra, grad_scaler=self.scaler.state_dict())   # floats and ints only
        return super().save_state(path, extra)

    def load_state(self, path, trust: bool = False) -> Dict[str, Any]:
        payload = super().load_state(path, trust=trust)
        if self.scaler is not None and payload.get("grad_scaler"):
            self.scaler.load_state_dict(payload["grad_scaler"])
        return payload

    # -- steps ------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        if self.strategy is not None or self.scaler is None:
            return super().train_step(images, labels, lr)
        return self._fp16_step(images, labels, lr)

    def _fp16_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        """The CPU loop with a GradScaler: fp16 gradients underflow without loss scaling."""
        model = self.ddp if self.ddp is not None else self.model
        model.train()
        set_lr(self.optimizer, lr)
        accum, mb = self.gradient_accumulation, self.micro_batch_size
        total = torch.zeros((), device=self.device)
        for i in range(accum):
            x = self.prepare(images[i * mb:(i + 1) * mb])
            y = labels[i * mb:(i + 1) * mb].to(self.device, non_blocking=True)
            sync = self.ddp.no_sync() if (self.ddp is not None and i < accum - 1) else nullcontext()
            with sync:
                with self.autocast():
                    logits = model(x)
                loss = self.loss_fn(logits, y) / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        grad_norm = None
        if self.recipe.optim.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)   # clip the true gradients, not the scaled ones
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             self.recipe.optim.clip_grad_norm))
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)          # skipped when a gradient is inf/nan
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=float(total), grad_norm=grad_norm, skipped=self.scaler.get_scale() < scale)
