"""What the kernel tests share: the device they run on and the tolerance rule.

Our max error against the fp32 reference must be at most twice PyTorch's own error in
that dtype (the reference run op by op in the low dtype) plus a small floor relative to
the largest reference value: fp32 summation order, about 1 ulp of fp16/bf16 (the
interpreter casts fp32 -> bf16 toward zero).
"""
import torch

from vit_accel_kernels import INTERPRETING

DEVICE = "cpu" if INTERPRETING or not torch.cuda.is_available() else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_ref(ours, ref, torch_lp, dtype, what):
    ref = ref.float()
    err = (ours.float() - ref).abs().max().item()
    torch_err = (torch_lp.float() - ref).abs().max().item()
    floor = FLOOR[dtype] * max(1.0, ref.abs().max().item())
    assert err <= 2 * torch_err + floor, f"{what}: error {err:.3e} > 2 x torch {torch_err:.3e} + {floor:.1e}"
