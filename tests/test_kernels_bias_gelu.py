"""Bias + GELU (erf and tanh) vs the fp32 reference: output, dx, dbias, gradcheck, errors.

Tolerance: at most twice PyTorch's own error in that dtype (the reference run in the low
dtype) plus a small floor (the interpreter's 1-ulp bf16 rounding).
"""
import pytest
import torch

from kernel_tolerance import DEVICE, DTYPES, assert_close_to_ref
from vit_accel_kernels.bias_gelu import bias_gelu, bias_gelu_ref




def _run(fn, x, bias, dy, approximate, **kw):
    x, bias = (t.detach().clone().requires_grad_() for t in (x, bias))
    y = fn(x, bias, approximate, **kw)
    y.backward(dy)
    return y.detach(), x.grad, bias.grad


def _check(shape, dtype, approximate, bias_dtype=None):
    bias_dtype = bias_dtype or dtype
    # Spread 3: covers GELU's negative tail, its knee and the linear part.
    x = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    bias = torch.randn(shape[-1], device=DEVICE).to(bias_dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    ours = _run(bias_gelu, x, bias, dy, approximate)
    ref = _run(bias_gelu_ref, x.float(), bias.float(), dy.float(), approximate)
    lowp = _run(bias_gelu_ref, x, bias, dy, approximate, upcast=False)
    for name, o, r, lp in zip(("y", "dx", "dbias"), ours, ref, lowp):
        assert o.shape == r.shape and torch.isfinite(o.float()).all(), name
        assert o.dtype == (bias_dtype if name == "dbias" else dtype), name
        assert_close_to_ref(o, r, lp, dtype, f"{name} {dtype} {shape} {approximate}")


# (rows..., hidden): ViT-Ti MLP 768, odd rows and a hidden size that is not a power of 2.
SHAPES = [(7, 768), (65, 100), (2, 33, 192), (3, 1280)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, approximate):
    _check(shape, dtype, approximate)


def test_fp32_bias_with_bf16_activations():
    _check((9, 192), torch.bfloat16, "none", bias_dtype=torch.float32)


def test_many_row_groups_reduce_dbias_exactly():
    # More rows than one program's group: dbias is a sum over several partial rows.
    x = torch.randn(1000, 40, device=DEVICE)
    bias = torch.randn(40, device=DEVICE, requires_grad=True)
    bias_gelu(x, bias).sum().backward()
    u = (x + bias.detach()).requires_grad_()
    torch.nn.functional.gelu(u).sum().backward()
    torch.testing.assert_close(bias.grad, u.grad.sum(0), rtol=1e-5, atol=1e-4)


def test_non_contiguous_input():
    x = torch.randn(64, 10, device=DEVICE).t()  # (10, 64), strided
    bias = torch.randn(64, device=DEVICE)
    torch.testing.assert_close(bias_gelu(x, bias, "tanh"), bias_gelu_ref(x, bias, "tanh"), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_fp32(approximate):
    # fp32 gradcheck: eps 1e-3 leaves ~1e-4 finite-difference noise, hence atol 2e-3.
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    bias = torch.randn(24, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: bias_gelu(x, b, approximate), (x, bias), eps=1e-3, atol=2e-3, rtol=1e-2, fast_mode=True)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.ones(4, 8), torch.ones(8), "erf"), ValueError, "approximate='erf'"),
        (lambda: (torch.ones(4, 8, dtype=torch.int64), torch.ones(8), "none"), TypeError, "dtype torch.int64"),
        (lambda: (torch.ones(4, 8), torch.ones(8, dtype=torch.int32), "none"), TypeError, "bias must be floating"),
        (lambda: (torch.ones(4, 8), torch.ones(9), "none"), ValueError, r"bias shape \(9,\)"),
    ],
)
def test_precondition_errors(make, error, match):
    x, bias, approximate = make()
    with pytest.raises(error, match=match):
        bias_gelu(x.to(DEVICE), bias.to(DEVICE), approximate)
