"""A stage plan's data: which modules each pipeline stage holds (no model, no device code).

`pipeline.py` builds and validates plans, `pipeline_cost.py` estimates them; both read these.
Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List


@dataclass
class Stage:
    index: int
    start: str                      # module name that begins the stage ("patch_embed", "blocks.3")
    ipu: int                        # device id (IPU id, or pipeline rank)
    blocks: List[int]               # encoder block indices it holds
    patch_embed: bool = False       # also cls_token, pos_embed
    norm: bool = False
    head: bool = False              # pooling, pre_logits, head

    @property
    def modules(self) -> List[str]:
        return ((["patch_embed"] if self.patch_embed else []) + [f"blocks.{i}" for i in self.blocks]
                + (["norm"] if self.norm else []) + (["head"] if self.head else []))


@dataclass
class StagePlan:
    stages: List[Stage]
    depth: int
    recompute: List[int]            # blocks whose outputs are recomputation checkpoints
    source: str                     # "splits", "layers_per_ipu", "auto" or "pipeline.stages"

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def starts(self) -> List[str]:
        return [s.start for s in self.stages]

    @property
    def layers_per_stage(self) -> List[int]:
        return [len(s.blocks) for s in self.stages]

    def stage_of_module(self, name: str) -> Stage:
        for s in self.stages:
            if name in s.modules:
                return s
        raise KeyError(f"{name!r} is in no stage; modules: {valid_modules(self.depth)}")

    def stage_of_param(self, param_name: str) -> Stage:
        """The stage owning a timm-keyed parameter (``blocks.4.mlp.fc1.weight`` -> its stage)."""
        return self.stage_of_module(module_of_param(param_name))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def valid_modules(depth: int) -> List[str]:
    return ["patch_embed"] + [f"blocks.{i}" for i in range(depth)] + ["norm", "head"]


def module_of_param(name: str) -> str:
    """Map a state-dict key to the plan's module name."""
    top = name.split(".")[0]
    if top in ("patch_embed", "cls_token", "pos_embed"):
        return "patch_embed"
    if top == "blocks":
        return ".".join(name.split(".")[:2])
    if top == "norm":
        return "norm"
    if top in ("pre_logits", "head"):
        return "head"
    raise KeyError(f"parameter {name!r} belongs to no plan module")
