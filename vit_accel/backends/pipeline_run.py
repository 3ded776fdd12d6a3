"""Running a stage plan: one stage as a module, a CPU emulation, torch's distributed pipelining.

``StageModule`` is the part of a ViT one stage runs, sharing the ViT's parameters.
``emulate_pipeline_step`` runs the stages in order over micro-batches on the CPU, as a
PopTorch pipeline computes one step: the oracle that one pipelined step equals one plain
step. ``PipelineRunner`` runs the same plan across processes, one stage per rank, with
torch's ``distributed.pipelining`` (GPipe or 1F1B).

Python 3.8 / torch 2.0 compatible; the pipelining package (torch >= 2.4) is imported only
inside ``PipelineRunner``.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..config import ConfigError
from .stages import Stage, StagePlan

# ---------------------------------------------------------------------------------------
# Running a plan: one stage as a module
# ---------------------------------------------------------------------------------------

class StageModule(nn.Module):
    """The part of a ViT one stage runs, sharing the ViT's parameters.

    Input: images (first stage) or tokens (B, 1 + N, D); output: tokens, or logits (last
    stage). Blocks listed in ``plan.recompute`` run under ``torch.utils.checkpoint`` when
    ``recompute`` is on: only their input is kept, the rest is recomputed in the backward,
    which is what a PopTorch recomputation checkpoint after each block does.
    """

    def __init__(self, model: nn.Module, stage: Stage, plan: StagePlan, recompute: bool = True):
        super().__init__()
        self.stage_index = stage.index
        # The ViT's own embedding and head code runs here (bound methods, not submodules: only
        # this stage's parts are registered, so only their parameters belong to the stage).
        self._embed = model.embed if stage.patch_embed else None
        self._head = model.forward_head if stage.head else None
        if stage.patch_embed:
            self.patch_embed, self.pos_drop = model.patch_embed, model.pos_drop
            self.cls_token, self.pos_embed = model.cls_token, model.pos_embed
        self.block_ids = list(stage.blocks)
        self.blocks = nn.ModuleList([model.blocks[i] for i in stage.blocks])
        self.checkpointed = [recompute and i in plan.recompute for i in stage.blocks]
        self.norm = model.norm if stage.norm else None
        if stage.head:
            self.pre_logits, self.head_drop, self.head = model.pre_logits, model.head_drop, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._embed is not None:
            x = self._embed(x)
        for blk, ckpt in zip(self.blocks, self.checkpointed):
            if ckpt and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        if self.norm is not None:
            x = self.norm(x)
        if self._head is not None:
            x = self._head(x)
        return x


def stage_modules(model: nn.Module, plan: StagePlan, recompute: bool = True) -> List[StageModule]:
    if len(model.blocks) != plan.depth:
        raise ConfigError(f"the plan is for depth {plan.depth} but the model has {len(model.blocks)} blocks")
    return [StageModule(model, s, plan, recompute) for s in plan.stages]


def emulate_pipeline_step(model: nn.Module, plan: StagePlan, images: torch.Tensor, labels: torch.Tensor,
                          micro_batch: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                          ) -> torch.Tensor:
    """One pipelined forward+backward on the CPU, as a PopTorch pipeline computes it.

    The batch is cut into micro-batches (``accumulation = len(images) / micro_batch``). Each
    micro-batch goes through the stages in order; stages only exchange activations (the input
    of each stage is a fresh leaf, as on a separate device) and, on the way back, the gradient
    of that activation. Gradients accumulate into ``.grad`` with the Mean reduction
    (each micro-batch's loss weighted 1/accumulation). Recomputation uses
    ``torch.utils.checkpoint`` at the plan's checkpoints. The caller steps the optimizer.
    Returns the per-micro-batch losses (detached), like ``OutputMode.All``.
    """
    if images.shape[0] % micro_batch or labels.shape[0] != images.shape[0]:
        raise ValueError(f"batch {images.shape[0]} (labels {labels.shape[0]}) is not a multiple of the "
                         f"micro-batch {micro_batch}")
    stages = stage_modules(model, plan)
    accumulation = images.shape[0] // micro_batch
    losses = []
    for x, y in zip(images.split(micro_batch), labels.split(micro_batch)):
        inputs, outputs = [], []
        h = x
        for st in stages:                       # forward, device by device
            h_in = h.detach().requires_grad_(st.stage_index > 0 and h.is_floating_point())
            h = st(h_in)
            inputs.append(h_in)
            outputs.append(h)
        loss = loss_fn(h, y)
        losses.append(loss.detach())
        grad = torch.autograd.grad(loss / accumulation, [outputs[-1]])[0]
        for i in range(len(stages) - 1, -1, -1):  # backward, device by device, in reverse
            torch.autograd.backward(outputs[i], grad)
            if i > 0:
                grad = inputs[i].grad
    return torch.stack(losses)


# ---------------------------------------------------------------------------------------
# The same plan across processes: torch.distributed.pipelining
# ---------------------------------------------------------------------------------------

class PipelineRunner:
    """Run a StagePlan with torch's distributed pipelining: one stage per rank of ``group``.

    Every rank holds the whole model (built from the same seed or checkpoint) and runs only
    its stage, placed on ``device``; an optimizer over ``model.parameters()`` updates only the
    local stage's parameters (the others have no gradient). ``step`` cuts the batch into
    ``micro_batches`` and runs ``ScheduleGPipe`` or ``Schedule1F1B``; gradients are the mean
    over micro-batches, equal to one step on the whole batch.
    """

    def __init__(self, model: nn.Module, plan: StagePlan, *, schedule: str = "gpipe", micro_batches: int = 4,
                 loss_fn: Optional[Callable] = None, device: Optional[torch.device] = None,
                 group: Any = None, recompute: bool = True):
        try:
            from torch.distributed import pipelining as pp  # torch>=2.x: guarded
        except ImportError as e:
            raise RuntimeError(f"PipelineRunner needs torch.distributed.pipelining (torch >= 2.4; this is "  # torch>=2.x: guarded
                               f"{torch.__version__}); "
                               f"the IPU path does not need it") from e
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("PipelineRunner needs torch.distributed initialized (torchrun, or "
                               "init_process_group) with one rank per stage")
        self.dist = dist
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if self.world != plan.num_stages:
            raise ConfigError(f"the plan has {plan.num_stages} stages ({', '.join(plan.starts)}) but the "
                              f"process group has {self.world} ranks; run one rank per stage")
        schedules = {"gpipe": pp.ScheduleGPipe, "1f1b": pp.Schedule1F1B}
        if schedule not in schedules:
            raise ConfigError(f"pipeline.schedule: {schedule!r} is not one of {', '.join(schedules)}")
        self.device = device or torch.device("cpu")
        self.module = StageModule(model, plan.stages[self.rank], plan, recompute).to(self.device)
        self.stage = pp.PipelineStage(self.module, self.rank, self.world, self.device, group=group)
        self.loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y))
        self.micro_batches = micro_batches
        self.schedule = schedules[schedule](self.stage, n_microbatches=micro_batches, loss_fn=self.loss_fn)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Forward+backward of one batch; the mean micro-batch loss, the same on every rank.
        Only the first rank reads ``images`` and only the last ``labels``."""
        if images.shape[0] % self.micro_batches:
            raise ValueError(f"batch {images.shape[0]} is not divisible by micro_batches {self.micro_batches}")
        losses: List[torch.Tensor] = []
        if self.is_first:
            self.schedule.step(images.to(self.device))
        elif self.is_last:
            self.schedule.step(target=labels.to(self.device), losses=losses)
        else:
            self.schedule.step()
        loss = torch.zeros(1)
        if self.is_last:
            loss[0] = torch.stack([l.detach().float().cpu() for l in losses]).mean()
        src = self.world - 1 if self.group is None else self.dist.get_global_rank(self.group, self.world - 1)
        self.dist.broadcast(loss, src=src, group=self.group)
        return float(loss[0])


def run_pipelined(model: nn.Module, plan: StagePlan, images: torch.Tensor, labels: torch.Tensor,
                  optimizer: Optional[torch.optim.Optimizer] = None, **runner_kwargs) -> float:
    """One pipelined training step across the ranks (see ``PipelineRunner``); steps
    ``optimizer`` if given. Build a ``PipelineRunner`` once to run many steps."""
    runner = PipelineRunner(model, plan, **runner_kwargs)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss = runner.step(images, labels)
    if optimizer is not None:
        optimizer.step()
    return loss
