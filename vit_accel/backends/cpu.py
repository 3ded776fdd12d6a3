"""CPU backend: the reference path, and the base of the GPU backend (same loop, other device).

One ``train_step`` = one optimizer step over ``micro_batch_size x gradient_accumulation``
images of this process, with the recipe's precision (precision.py: fp32, bf16 autocast, fp16
with a GradScaler on GPUs). On the CPU, ``cpu.precision`` and ``cpu.compile`` may be "auto"
(cpu_choice.py decides, and the backend prints what and why); a compiled run compiles the
training forward/backward once (static shapes) and evaluates eagerly. Several processes
(``torchrun``) run data parallel: plain DDP when ``distributed.zero_stage`` is -1, DeepSpeed ZeRO
(gloo on CPU) when it is 0..3, which then runs its own step (zero.py).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from ..config import batch_split, vit_options
from ..data.transforms import normalize
from ..engine import distributed
from ..engine.loss import training_loss
from ..engine.optim import build_optimizer, set_lr
from ..model import vit_config
from ..model import unwrap
from .base import Backend, StepResult, full_weights, read_checkpoint, write_checkpoint
from .cpu_choice import Choice, choose_compile, choose_precision
from .precision import precision_for

EAGER_ATTENTION_TOKENS = 197   # up to ViT-B/16 at 224 px (measured); see model_options


class CPUBackend(Backend):
    name = "cpu"
    device: torch.device   # where the model and the prepared batches live (the GPU subclass: its CUDA device)

    def __init__(self, recipe):
        super().__init__(recipe)
        self.device = self.select_device()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.strategy: Optional[Any] = None   # DeepSpeed engine wrapper when zero_stage >= 0
        self.ddp: Optional[torch.nn.Module] = None
        distributed.join_process_group(self.dist_backend())
        precision, self.compile_choice = self._choose_settings()
        self.precision = precision_for(precision.value, self.device.type,
                                       loss_scaling=recipe.distributed.zero_stage < 0)
        self._train_model: Optional[torch.nn.Module] = None   # the compiled training forward, when compiled
        sec, g = self.section, recipe.train.global_batch_size
        self._micro, self._accum = batch_split(g, sec.micro_batch_size, distributed.world_size(),
                                               sec.gradient_accumulation, self.name)
        if distributed.is_main():
            print(f"batch: global {g} = micro-batch {self._micro} x accumulation {self._accum} x "
                  f"{distributed.world_size()} process(es) ({self.name}.micro_batch_size {sec.micro_batch_size} "
                  f"is the upper bound)", flush=True)
            if self.compile_choice is not None:
                print(f"{self.name}: precision {precision.value} ({precision.reason}); compile "
                      f"{self.compile_choice.value} ({self.compile_choice.reason})", flush=True)

    def _choose_settings(self) -> Tuple[Choice, Optional[Choice]]:
        """The precision, and whether to compile the training step (None: the subclass compiles itself)."""
        zero = self.recipe.distributed.zero_stage >= 0
        precision = choose_precision(self.section.precision, zero)
        return precision, choose_compile(self.section.compile, self.recipe, precision.value,
                                         distributed.world_size(), zero)

    # -- setup ----------------------------------------------------------------------------
    @property
    def section(self):
        return getattr(self.recipe, self.name)

    def model_options(self) -> Dict[str, Any]:
        opts = super().model_options()
        tokens = vit_config(self.recipe.model.name, **vit_options(self.recipe.model)).num_patches + 1
        if self._compiles() and tokens <= EAGER_ATTENTION_TOKENS:
            # Compiled, attention as matmul + softmax: inductor fuses the scaling and softmax (and their
            # backward) into the matmuls' neighbours, which beats the CPU's flash-attention kernel at
            # these lengths (vit-ti-digits' 65 tokens: 1.5x per training step). Longer sequences keep
            # SDPA, which never holds the N x N scores of every head for the backward.
            opts["attn_impl"] = "eager"
        return opts

    def _compiles(self) -> bool:
        return self.compile_choice is not None and self.compile_choice.value == "true"

    def select_device(self) -> torch.device:
        if self.recipe.cpu.threads:
            torch.set_num_threads(self.recipe.cpu.threads)
        return torch.device("cpu")

    def dist_backend(self) -> str:
        b = self.recipe.distributed.dist_backend
        return "gloo" if b == "auto" else b

    def setup(self, model: torch.nn.Module) -> None:
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, self.recipe.optim)
        if self.recipe.distributed.zero_stage >= 0:
            from .zero import DeepSpeedStrategy

            self.strategy = DeepSpeedStrategy(self)
        elif distributed.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
        if self._compiles():
            # Static shapes: the training batch never changes; evaluation (other sizes) stays eager.
            # fallback_random: dropout draws its masks with torch's generator, as eagerly (the same
            # masks as an eager run), and the backward reuses them; inductor's own CPU random numbers
            # start a Philox generator per element. Measured on 2 cores: 26 vs 33 ns per dropped
            # element, forward + backward, and vit-b16-ft drops 88M activations per step at batch 8.
            self._train_model = torch.compile(self.ddp if self.ddp is not None else self.model, dynamic=False,
                                              options={"fallback_random": True})

    # -- batch granularity ----------------------------------------------------------------
    @property
    def micro_batch_size(self) -> int:
        """The micro-batch in use: the largest that divides this process's share, up to the recipe's."""
        return self._micro

    @property
    def gradient_accumulation(self) -> int:
        return self._accum

    @property
    def batch_per_call(self) -> int:
        return self._micro * self._accum

    @property
    def eval_batch_size(self) -> int:
        return self.recipe.train.eval_batch_size or self._micro

    # -- steps ----------------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] on the host -> normalized float32 on the device (4x fewer bytes moved)."""
        return normalize(images.to(self.device, non_blocking=True), self.recipe.data.mean, self.recipe.data.std)

    def micro_batches(self, images: torch.Tensor, labels: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The call's ``gradient_accumulation`` micro-batches, prepared, on the device."""
        mb = self._micro
        for i in range(self._accum):
            yield (self.prepare(images[i * mb:(i + 1) * mb]),
                   labels[i * mb:(i + 1) * mb].to(self.device, non_blocking=True))

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss (engine/loss.py) with the recipe's label smoothing."""
        return training_loss(logits, target, self.recipe.optim.label_smoothing)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        if self.strategy is not None:
            return self.strategy.train_step(images, labels, lr)
        model = self.ddp if self.ddp is not None else self.model
        model.train()
        set_lr(self.optimizer, lr)
        accum, precision = self._accum, self.precision
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(self.micro_batches(images, labels)):
            # DDP all-reduces only on the last micro-batch of the step
            sync = self.ddp.no_sync() if (self.ddp is not None and i < accum - 1) else nullcontext()
            with sync:
                with precision.autocast():
                    logits = self._forward(model, x)
                loss = self.loss_fn(logits, y) / accum
                precision.backward(loss)
            total += loss.detach()
        grad_norm, skipped = precision.step(self.optimizer, self.model.parameters(), self.recipe.optim.clip_grad_norm)
        return StepResult(loss=float(total), grad_norm=grad_norm, skipped=skipped)

    def _forward(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The compiled training forward when there is one; a compile that fails (its first call)
        says why and leaves the run eager instead of ending it."""
        if self._train_model is None:
            return model(x)
        try:
            return self._train_model(x)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            self._train_model = None
            if distributed.is_main():
                print(f"{self.name}: torch.compile failed ({str(e).splitlines()[0][:200]}); training continues "
                      f"eager (set {self.name}.compile=false to skip the attempt)", flush=True)
            return model(x)

    @torch.no_grad()
    def eval_step(self, images: torch.Tensor) -> torch.Tensor:
        model = self.strategy.module if self.strategy is not None else self.model
        model.eval()
        with self.precision.autocast():
            logits = model(self.prepare(images))
        return logits.float().cpu()

    # -- state: the loss scale travels with the checkpoint (exact fp16 resume) --------------
    def save_state(self, path, extra: Dict[str, Any]):
        if self.strategy is not None:
            return self.strategy.save_state(path, extra)
        extra = dict(extra, **self.precision.state_dict())
        return write_checkpoint(path, self.model_state_dict(), self.optimizer.state_dict(), extra, self.name)

    def load_state(self, path, trust: bool = False) -> Dict[str, Any]:
        if self.strategy is not None:
            return self.strategy.load_state(path, trust)   # DeepSpeed's own files, checked, then read by DeepSpeed
        payload = read_checkpoint(path, trust, self.name)
        unwrap(self.model).load_state_dict(payload["model"])
        if payload["optimizer"] is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
        self.precision.load_state_dict(payload)
        return payload

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full fp32 weights with timm keys on the CPU (collective under ZeRO)."""
        if self.strategy is not None:
            return self.strategy.model_state_dict()
        return full_weights(self.model)
