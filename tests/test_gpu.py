"""GPU backend: availability, op choices and imports everywhere; training and kernels on CUDA.

Tests marked ``needs_cuda`` skip on machines without a CUDA device (with the reason); they run
on the GPU machines (H100/H200) where the kernels compile for real.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_accel.backends import BackendUnavailable, create_backend
from vit_accel.backends.gpu import GPUBackend, cuda_unavailable_reason, gpu_model_options
from vit_accel.backends.precision import LossScaledFP16
from vit_accel.config import Recipe
from vit_accel.model import create_vit

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none present)")
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="checks the message shown where CUDA is missing")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")


def small_recipe(**gpu) -> Recipe:
    r = Recipe()
    r.model.name, r.model.img_size, r.model.patch_size, r.model.num_classes = "vit-ti16", 32, 4, 10
    r.optim.name, r.optim.lr, r.optim.weight_decay = "adamw", 1e-3, 0.0
    r.train.global_batch_size = 16
    r.gpu.micro_batch_size = 8                 # accumulation 2 on one GPU
    for k, v in gpu.items():
        setattr(r.gpu, k, v)
    return r


def small_model(recipe: Recipe, backend) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_vit("vit-ti16", img_size=32, patch_size=4, num_classes=10, depth=2, **backend.model_options())


def fixed_batch(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---------------------------------------------------------------------------------------
# Everywhere
# ---------------------------------------------------------------------------------------

def test_gpu_module_imports_neither_triton_nor_deepspeed():
    code = ("import sys, vit_accel.backends.gpu as g; "
            "bad = [m for m in ('triton', 'deepspeed') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_model_options_follow_the_gpu_section_one_by_one():
    assert gpu_model_options(Recipe()) == {"attn_impl": "triton", "norm_impl": "triton", "mlp_impl": "triton"}
    r = Recipe()
    r.gpu.attn_impl, r.gpu.mlp_impl = "sdpa", "torch"
    assert gpu_model_options(r) == {"attn_impl": "sdpa", "norm_impl": "triton", "mlp_impl": "torch"}


def test_op_choices_do_not_change_the_state_dict():
    """Checkpoints move between backends: the GPU ops build the same parameter tree."""
    ref = create_vit("vit-ti16", img_size=32, patch_size=4, depth=1).state_dict()
    gpu = create_vit("vit-ti16", img_size=32, patch_size=4, depth=1, **gpu_model_options(Recipe())).state_dict()
    assert list(ref) == list(gpu)
    assert all(ref[k].shape == gpu[k].shape for k in ref)


def test_nccl_by_default_and_recipe_can_override():
    b = object.__new__(GPUBackend)    # only the recipe matters to dist_backend()
    b.recipe = Recipe()
    assert b.dist_backend() == "nccl"
    b.recipe.distributed.dist_backend = "gloo"
    assert b.dist_backend() == "gloo"


@no_cuda_only
def test_unavailable_reason_says_what_is_missing_and_what_to_do():
    reason = GPUBackend.unavailable_reason()
    assert reason == cuda_unavailable_reason()
    assert "\n" not in reason
    assert "CUDA build of torch" in reason and "NVIDIA GPU" in reason
    assert "--backend cpu" in reason and "install torch with CUDA" in reason


@no_cuda_only
def test_create_backend_gpu_refuses_with_the_reason():
    with pytest.raises(BackendUnavailable, match=r"--backend gpu: needs a CUDA build of torch"):
        create_backend("gpu", Recipe())


@no_cuda_only
def test_cli_train_on_gpu_without_cuda_exits_2(capsys):
    from vit_accel.cli import main

    assert main(["train", "--backend", "gpu", "--config", "vit-ti-digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend cpu" in err


# ---------------------------------------------------------------------------------------
# On a CUDA device
# ---------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_gpu_backend_fits_a_batch_with_triton_kernels(precision):
    r = small_recipe(precision=precision)
    b = GPUBackend(r)
    assert b.device.type == "cuda" and b.gradient_accumulation == 2
    b.setup(small_model(r, b))
    assert isinstance(b.precision, LossScaledFP16) == (precision == "fp16")
    images, labels = fixed_batch()
    losses = [b.train_step(images, labels, 1e-3).loss for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    logits = b.eval_step(images)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape == (16, 10)


@needs_cuda
def test_triton_ops_match_torch_ops_on_the_same_weights():
    r = small_recipe()
    ours = GPUBackend(r)
    ours.setup(small_model(r, ours))
    ref_recipe = small_recipe(attn_impl="sdpa", norm_impl="torch", mlp_impl="torch")
    ref = GPUBackend(ref_recipe)
    ref.setup(small_model(ref_recipe, ref))
    ref.load_model_state_dict(ours.model_state_dict())
    images, _ = fixed_batch()
    a, b = ours.eval_step(images), ref.eval_step(images)
    assert (a - b).abs().max().item() < 2e-2 * max(1.0, b.abs().max().item())


@needs_cuda
def test_gpu_backend_with_torch_compile():
    r = small_recipe(compile=True, attn_impl="sdpa", norm_impl="torch", mlp_impl="torch")
    b = GPUBackend(r)
    b.setup(small_model(r, b))
    images, labels = fixed_batch()
    first = b.train_step(images, labels, 1e-3).loss
    assert b.train_step(images, labels, 1e-3).loss < first
    assert set(b.model_state_dict()) == set(create_vit("vit-ti16", img_size=32, patch_size=4, num_classes=10,
                                                       depth=2).state_dict())


@needs_cuda
@needs_deepspeed
@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "fp16")])
def test_deepspeed_on_one_gpu(stage, precision):
    r = small_recipe(precision=precision)
    r.distributed.zero_stage = stage
    b = GPUBackend(r)
    b.setup(small_model(r, b))
    assert b.strategy is not None and b.strategy.zero_stage == stage
    images, labels = fixed_batch()
    losses = [b.train_step(images, labels, 1e-3).loss for _ in range(8)]
    assert losses[-1] < losses[0], losses
    sd = b.model_state_dict()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
