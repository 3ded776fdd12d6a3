"""GPU backend: the CPU loop on a CUDA device, with our Triton kernels, bf16/fp16 and NCCL.

One process per GPU (``torchrun`` / the ``deepspeed`` launcher set ``LOCAL_RANK``). Defaults
from the recipe's ``gpu`` section: bf16 autocast, the Triton attention / LayerNorm / bias-GELU
kernels (``gpu.attn_impl``, ``gpu.norm_impl``, ``gpu.mlp_impl``, switchable one by one), optional
``torch.compile`` (``gpu.compile``). fp16 uses dynamic loss scaling: ``torch.amp.GradScaler``
in the CPU backend's loop (precision.py), DeepSpeed's ``fp16`` section (loss_scale 0) under ZeRO
(``distributed.zero_stage`` 0..3, see zero.py).

Importing this module imports neither triton nor deepspeed: the model imports the kernels when
built with a "triton" op, zero.py imports deepspeed when a recipe asks for ZeRO.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from ..config import Recipe
from ..errors import BackendUnavailable
from .cpu import CPUBackend
from .cpu_choice import Choice


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

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        return cuda_unavailable_reason()

    def model_options(self) -> Dict[str, Any]:
        return gpu_model_options(self.recipe)

    def _choose_settings(self):
        """gpu.precision as set; gpu.compile compiles the whole model in setup."""
        return Choice(self.section.precision, "gpu.precision"), None

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

    # -- model and optimizer ----------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> None:
        super().setup(model)   # places the model, builds our optimizer, wraps DDP or DeepSpeed
        if self.section.compile:
            if self.strategy is not None:
                # DeepSpeed compiles the module inside its engine (its hooks stay outside the graph)
                self.strategy.engine.compile()
            elif self.ddp is not None:
                self.ddp = torch.compile(self.ddp)
            else:
                self.model = torch.compile(self.model)
