"""Flash attention vs the fp32 reference: forward, lse, dq/dk/dv, gradcheck, preconditions.

Tolerance: our max error against the fp32 reference must be at most twice PyTorch's own
error in that dtype (the reference run op by op in the low dtype) plus a small floor
(fp32 summation order; the interpreter's round-toward-zero bf16 cast, 1 ulp).
Runs under TRITON_INTERPRET=1 on CPU and unchanged on CUDA.
"""
import math

import pytest
import torch

from kernel_tolerance import DEVICE, DTYPES, assert_close_to_ref
from vit_accel_kernels.attention import attention_ref, flash_attention, flash_attention_fwd




def _inputs(b, h, n_q, n_kv, d, dtype):
    q = torch.randn(b, h, n_q, d, device=DEVICE).to(dtype)
    k = torch.randn(b, h, n_kv, d, device=DEVICE).to(dtype)
    v = torch.randn(b, h, n_kv, d, device=DEVICE).to(dtype)
    return q, k, v


def _run(fn, q, k, v, do, **kw):
    """Forward + backward; returns out, dq, dk, dv."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _check_against_torch(b, h, n_q, n_kv, d, dtype):
    q, k, v = _inputs(b, h, n_q, n_kv, d, dtype)
    do = torch.randn(b, h, n_q, d, device=DEVICE).to(dtype)
    scale = 1.0 / math.sqrt(d)
    ours = _run(flash_attention, q, k, v, do, softmax_scale=scale)
    ref = _run(attention_ref, q.float(), k.float(), v.float(), do.float(), softmax_scale=scale)
    lowp = _run(attention_ref, q, k, v, do, softmax_scale=scale, upcast=False)
    for name, o, r, lp in zip(("out", "dq", "dk", "dv"), ours, ref, lowp):
        assert o.dtype == dtype and o.shape == r.shape
        assert torch.isfinite(o.float()).all(), name
        assert_close_to_ref(o, r, lp, dtype, f"{name} {dtype} {(b, h, n_q, n_kv, d)}")


# (batch, heads, seq, head_dim): seq 1, sub-block 50, digits 65, ViT 197 and 577 tokens.
# The interpreter's dot gets slow as head_dim grows (no BLAS), hence one head at 197 x 80.
SHAPES = [(1, 2, 1, 64), (2, 2, 50, 64), (1, 2, 65, 80), (2, 3, 197, 64), (1, 1, 197, 80), (1, 1, 577, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    b, h, n, d = shape
    _check_against_torch(b, h, n, n, d, dtype)


@pytest.mark.parametrize("d", [32, 128])
def test_other_head_dims(d):
    _check_against_torch(1, 2, 65, 65, d, torch.bfloat16)


def test_query_and_key_lengths_may_differ():
    _check_against_torch(1, 2, 50, 130, 64, torch.float32)


def test_default_scale_and_strided_qkv_views():
    # The ViT attention layer passes strided views of one (B, N, 3, H, D) projection.
    b, n, h, d = 2, 65, 2, 32
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE, dtype=torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = flash_attention(q, k, v)
    ref = attention_ref(q.float(), k.float(), v.float())  # scale 1/sqrt(d) both ways
    assert out.is_contiguous()
    assert (out.float() - ref).abs().max().item() < 2e-3


def test_saved_lse_is_the_log_sum_exp_of_the_scores():
    q, k, v = _inputs(1, 2, 65, 65, 80, torch.float32)
    scale = 0.3
    _, lse = flash_attention_fwd(q, k, v, scale)
    expected = torch.logsumexp(q @ k.transpose(-2, -1) * scale, dim=-1)
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-5)


def test_large_logits_stay_finite():
    # Scores ~ +-400: the online softmax must subtract the running max, never overflow.
    q, k, v = _inputs(1, 1, 65, 65, 64, torch.bfloat16)
    out = flash_attention(q * 8, k * 8, v, softmax_scale=1.0)
    ref = attention_ref((q * 8).float(), (k * 8).float(), v.float(), softmax_scale=1.0)
    assert torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().max().item() < 0.05


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_fp32():
    # fp32 gradcheck (the kernels take no fp64): eps 1e-3 gives ~1e-4 finite-difference
    # noise, so atol is 1e-3 rather than the fp64 default. fast_mode checks a random
    # projection of the Jacobian: a few launches instead of one per input element.
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 5, 7, 16, torch.float32))
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, softmax_scale=0.5), (q, k, v),
        eps=1e-3, atol=1e-3, rtol=1e-2, fast_mode=True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(d=256), ValueError, "head_dim 256"),
        (dict(d=12), ValueError, "head_dim 12"),
        (dict(d=20), ValueError, "head_dim 20"),
        (dict(dtype=torch.int32), TypeError, "dtype torch.int32"),
        (dict(dtype=torch.float64), TypeError, "dtype torch.float64"),
        (dict(mixed=True), TypeError, "share one dtype"),
        (dict(kv_shape=(1, 3, 9, 32)), ValueError, "share batch, heads and head_dim"),
        (dict(v_len=10), ValueError, "same shape"),
        (dict(three_d=True), ValueError, "must be 4-D"),
    ],
)
def test_precondition_errors(kwargs, error, match):
    d = kwargs.get("d", 32)
    dtype = kwargs.get("dtype", torch.float16)
    q = torch.ones(1, 2, 9, d, device=DEVICE).to(dtype)
    k = torch.ones(kwargs.get("kv_shape", (1, 2, 9, d)), device=DEVICE).to(dtype)
    v = torch.ones(kwargs.get("kv_shape", (1, 2, kwargs.get("v_len", 9), d)), device=DEVICE).to(dtype)
    if kwargs.get("mixed"):
        v = v.float()
    if kwargs.get("three_d"):
        q = q[0]
    with pytest.raises(error, match=match):
        flash_attention(q, k, v)
