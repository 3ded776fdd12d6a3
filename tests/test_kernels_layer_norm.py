"""LayerNorm(+residual) vs the fp32 reference: output, h, dx, dresidual, dweight, dbias.

Tolerance: at most twice PyTorch's own error in that dtype (the reference run in the low
dtype) plus a small floor (fp32 summation order; the interpreter's 1-ulp bf16 rounding).
"""
import pytest
import torch

from kernel_tolerance import DEVICE, DTYPES, assert_close_to_ref
from vit_accel_kernels.layer_norm import layer_norm, layer_norm_ref

EPS = 1e-6



def _run(fn, x, w, b, r, dy, dh, **kw):
    """Forward + backward through y (and h); returns outputs then grads of x, w, b, r."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    r = r.detach().clone().requires_grad_() if r is not None else None
    out = fn(x, w, b, EPS, residual=r, **kw)
    if r is None:
        out.backward(dy)
        return [out.detach(), x.grad, w.grad, b.grad]
    y, h = out
    torch.autograd.backward([y, h], [dy, dh])
    return [y.detach(), h.detach(), x.grad, w.grad, b.grad, r.grad]


def _check(shape, dtype, residual, wdtype=None):
    wdtype = wdtype or dtype
    n = shape[-1]
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)
    w = (1 + 0.2 * torch.randn(n, device=DEVICE)).to(wdtype)
    b = (0.2 * torch.randn(n, device=DEVICE)).to(wdtype)
    r = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    dh = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    up = lambda t: t.float() if t is not None else None  # noqa: E731
    ours = _run(layer_norm, x, w, b, r, dy, dh)
    ref = _run(layer_norm_ref, up(x), up(w), up(b), up(r), up(dy), up(dh))
    lowp = _run(layer_norm_ref, x, w, b, r, dy, dh, upcast=False)
    names = ["y", "dx", "dw", "db"] if r is None else ["y", "h", "dx", "dw", "db", "dres"]
    for name, o, rf, lp in zip(names, ours, ref, lowp):
        assert o.shape == rf.shape and torch.isfinite(o.float()).all(), name
        assert o.dtype == (wdtype if name in ("dw", "db") else dtype), name
        assert_close_to_ref(o, rf, lp, dtype, f"{name} {dtype} {shape} residual={residual}")


# Rows are any leading shape; hidden 192 (ViT-Ti), 200 (not a power of 2), 768, 1280.
SHAPES = [(7, 192), (65, 192), (2, 9, 200), (3, 5, 768), (5, 1280)]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, residual):
    _check(shape, dtype, residual)


def test_fp32_weights_with_bf16_activations():
    _check((9, 192), torch.bfloat16, True, wdtype=torch.float32)


def test_fp32_residual_stream_with_bf16_branch():
    # Under autocast the residual stream can stay fp32 while the branch output is bf16:
    # h keeps the residual's dtype, y takes x's; grads come back in each input's dtype.
    x = torch.randn(5, 192, device=DEVICE).bfloat16().requires_grad_()
    r = torch.randn(5, 192, device=DEVICE).requires_grad_()
    w, b = torch.ones(192, device=DEVICE), torch.zeros(192, device=DEVICE)
    y, h = layer_norm(x, w, b, EPS, residual=r)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y_ref, h_ref = layer_norm_ref(x.detach(), w, b, EPS, residual=r.detach())
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    assert (y.float() - y_ref.float()).abs().max() < 0.05
    (y.float().square().sum() + h.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), r.grad, rtol=1e-2, atol=1e-2)


def test_residual_grad_includes_h_grad_and_unused_outputs():
    x, r = torch.randn(2, 4, 64, device=DEVICE), torch.randn(2, 4, 64, device=DEVICE)
    w, b = torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    x.requires_grad_(), r.requires_grad_()
    # Only h is used downstream: y's grad arrives as None, dx must equal the h grad.
    _, h = layer_norm(x, w, b, EPS, residual=r)
    (3 * h).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(r.grad, torch.full_like(r, 3.0))


def test_no_weight_no_bias_and_strided_rows():
    base = torch.randn(6, 300, device=DEVICE)
    xs = base.clone().requires_grad_()
    y = layer_norm(xs[:, :192], None, None, 1e-5)  # rows strided by 300, last dim contiguous
    ref = torch.nn.functional.layer_norm(base[:, :192], (192,), eps=1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert xs.grad[:, 192:].abs().max() == 0
    assert xs.grad[:, :192].abs().max() < 1e-4  # sum of a normalized row has zero gradient


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_fp32():
    # fp32 gradcheck with eps 1e-3: finite differences carry ~1e-4 noise, hence atol 2e-3;
    # fast_mode checks a random projection of the Jacobian (few interpreter launches).
    x = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    r = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    w = (1 + 0.1 * torch.randn(24, device=DEVICE)).requires_grad_()
    b = (0.1 * torch.randn(24, device=DEVICE)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: layer_norm(x, w, b, EPS, residual=r), (x, w, b, r),
        eps=1e-3, atol=2e-3, rtol=1e-2, fast_mode=True)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.ones(4, 8, dtype=torch.int32), None, None, None), TypeError, "dtype torch.int32"),
        (lambda: (torch.ones(4, 8), torch.ones(7), None, None), ValueError, r"weight shape \(7,\)"),
        (lambda: (torch.ones(4, 8), None, torch.ones(8, 2), None), ValueError, "bias shape"),
        (lambda: (torch.ones(4, 8), None, None, torch.ones(4, 9)), ValueError, "residual shape"),
        (lambda: (torch.ones(4, 8), None, None, torch.ones(4, 8).double()), TypeError, "residual has dtype"),
        (lambda: (torch.ones(2, 9000), None, None, None), ValueError, "hidden size 9000"),
    ],
)
def test_precondition_errors(make, error, match):
    x, w, b, r = (t.to(DEVICE) if t is not None else None for t in make())
    with pytest.raises(error, match=match):
        layer_norm(x, w, b, EPS, residual=r)
