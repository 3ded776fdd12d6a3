"""Kernel microbenchmarks at ViT shapes: ours vs torch SDPA backends, eager and compile.

    pytest tests/bench -m bench          # on a CUDA machine; writes build/bench/*.{json,md}

Attention: ViT-B/16 at 224 px (B=128, H=12, N=197, D=64) and ViT-L/16 at 384 px
(B=32, H=16, N=577, D=64), bf16, forward and forward+backward, against every SDPA backend
that runs (flash, efficient, cudnn, math). FLOPs: 4*B*H*N^2*D forward, 2.5x that backward.
LayerNorm(+residual) and bias+GELU: GB/s over the minimum bytes moved, against eager
torch and torch.compile. Without CUDA everything skips except one tiny interpreter run
that checks the harness end to end.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from _report import Report, time_ms

from vit_accel_kernels import INTERPRETING

pytestmark = pytest.mark.bench

HAS_CUDA = torch.cuda.is_available() and not INTERPRETING
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none present)")

ATTN_CASES = {"vit-b16-224": (128, 12, 197, 64), "vit-l16-384": (32, 16, 577, 64)}
# (rows, hidden): batch x tokens of ViT-B/16-224 and ViT-L/16-384
LN_CASES = {"vit-b16-224": (128 * 197, 768), "vit-l16-384": (32 * 577, 1024)}
GELU_CASES = {"vit-b16-224": (128 * 197, 3072), "vit-l16-384": (32 * 577, 4096)}


def _attention_providers():
    from vit_accel_kernels.attention import flash_attention

    providers = {"ours (triton)": lambda q, k, v: flash_attention(q, k, v)}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return providers
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue

        def run(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        providers[f"sdpa {name.lower()}"] = run
    return providers


def _fwd_bwd(fn, inputs, grad_out):
    """A closure running forward + backward; autograd.grad avoids .grad accumulation kernels."""

    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, inputs, grad_out[: len(outs)])

    return step


def _bench(report, case, provider, mode, fn, device, warmup, rep, **rate):
    try:
        ms = time_ms(fn, device, warmup=warmup, rep=rep)
    except Exception as e:  # a backend that refuses these shapes/dtypes is reported, not fatal
        return report.add(case, provider, mode, None, note=f"failed: {type(e).__name__}: {str(e)[:60]}")
    return report.add(case, provider, mode, ms, **rate)


def _run_attention(report, cases, device, dtype, providers, warmup, rep):
    for case, (b, h, n, d) in cases.items():
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(b, h, n, d, device=device, dtype=dtype)
        flops = 4 * b * h * n * n * d
        label = f"{case} B{b} H{h} N{n} D{d} {str(dtype)[6:]}"
        for name, fn in providers.items():
            with torch.no_grad():
                _bench(report, label, name, "fwd", lambda: fn(q, k, v), device, warmup, rep, flops=flops)
            _bench(report, label, name, "fwd+bwd", _fwd_bwd(fn, (q, k, v), (do,)), device, warmup, rep,
                   flops=flops * 3.5)


def _maybe_compile(fn):
    try:
        return torch.compile(fn)
    except Exception:  # pragma: no cover
        return None


@needs_cuda
def test_bench_attention():
    device = torch.device("cuda")
    report = Report("attention", device)
    _run_attention(report, ATTN_CASES, device, torch.bfloat16, _attention_providers(), warmup=5, rep=20)
    report.write()
    assert any(r["ms"] is not None for r in report.rows if r["provider"] == "ours (triton)")


def _run_layer_norm(report, cases, device, dtype, warmup, rep, compile=True):
    from vit_accel_kernels.layer_norm import layer_norm

    eager_res = lambda x, r, w, b: (lambda h: (F.layer_norm(h, h.shape[-1:], w, b, 1e-6), h))(x + r)  # noqa: E731
    eager = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6)  # noqa: E731
    for case, (m, n) in cases.items():
        x, r = (torch.randn(m, n, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        w = torch.ones(n, device=device, dtype=dtype, requires_grad=True)
        b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
        dy, dh = torch.randn(m, n, device=device, dtype=dtype), torch.randn(m, n, device=device, dtype=dtype)
        elt = dtype.itemsize * m * n
        groups = {
            # residual: fwd reads x, r, writes y, h; bwd reads h, dy, dh, writes dx
            "add+LN": (
                {"ours (triton)": lambda x, r, w, b: layer_norm(x, w, b, 1e-6, residual=r),
                 "torch eager": eager_res, "torch.compile": _maybe_compile(eager_res) if compile else None},
                (x, r, w, b), (dy, dh), 4 * elt, 4 * elt),
            # plain: fwd reads x, writes y; bwd reads x, dy, writes dx
            "LN": (
                {"ours (triton)": lambda x, w, b: layer_norm(x, w, b, 1e-6),
                 "torch eager": eager, "torch.compile": _maybe_compile(eager) if compile else None},
                (x, w, b), (dy,), 2 * elt, 3 * elt),
        }
        for kind, (providers, inputs, grads, fwd_bytes, bwd_bytes) in groups.items():
            label = f"{case} {kind} M{m} N{n} {str(dtype)[6:]}"
            for name, fn in providers.items():
                if fn is None:
                    continue
                with torch.no_grad():
                    _bench(report, label, name, "fwd", lambda fn=fn: fn(*inputs), device, warmup, rep,
                           nbytes=fwd_bytes)
                _bench(report, label, name, "fwd+bwd", _fwd_bwd(fn, inputs, grads), device, warmup, rep,
                       nbytes=fwd_bytes + bwd_bytes)


def _run_bias_gelu(report, cases, device, dtype, warmup, rep, compile=True):
    from vit_accel_kernels.bias_gelu import bias_gelu

    for approximate in ("none", "tanh"):
        eager = lambda x, b, a=approximate: F.gelu(x + b, approximate=a)  # noqa: E731
        providers = {"ours (triton)": lambda x, b, a=approximate: bias_gelu(x, b, a),
                     "torch eager": eager, "torch.compile": _maybe_compile(eager) if compile else None}
        for case, (m, n) in cases.items():
            x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(m, n, device=device, dtype=dtype)
            elt = dtype.itemsize * m * n  # fwd: read x, write y; bwd: read x, dy, write dx
            label = f"{case} gelu-{approximate} M{m} N{n} {str(dtype)[6:]}"
            for name, fn in providers.items():
                if fn is None:
                    continue
                with torch.no_grad():
                    _bench(report, label, name, "fwd", lambda fn=fn: fn(x, b), device, warmup, rep, nbytes=2 * elt)
                _bench(report, label, name, "fwd+bwd", _fwd_bwd(fn, (x, b), (dy,)), device, warmup, rep,
                       nbytes=5 * elt)


@needs_cuda
@pytest.mark.parametrize("name, run, cases", [("layer_norm", _run_layer_norm, LN_CASES),
                                              ("bias_gelu", _run_bias_gelu, GELU_CASES)], ids=["layer_norm", "bias_gelu"])
def test_bench_memory_bound_kernel(name, run, cases):
    device = torch.device("cuda")
    report = Report(name, device)
    run(report, cases, device, torch.bfloat16, warmup=5, rep=20)
    report.write()


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter smoke run is for machines without CUDA")
@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")
def test_interpreter_smoke(tmp_path):
    """The harness end to end on tiny shapes, one repetition, no torch.compile."""
    from vit_accel_kernels.attention import attention_ref, flash_attention

    device = torch.device("cpu")
    attn = Report("attention_smoke", device)
    providers = {"ours (triton interpreter)": lambda q, k, v: flash_attention(q, k, v),
                 "torch math": lambda q, k, v: attention_ref(q, k, v, 1 / math.sqrt(q.shape[-1]))}
    _run_attention(attn, {"tiny": (1, 2, 65, 64)}, device, torch.float32, providers, warmup=0, rep=1)
    norm, gelu = Report("layer_norm_smoke", device), Report("bias_gelu_smoke", device)
    _run_layer_norm(norm, {"tiny": (33, 192)}, device, torch.float32, warmup=0, rep=1, compile=False)
    _run_bias_gelu(gelu, {"tiny": (33, 192)}, device, torch.float32, warmup=0, rep=1, compile=False)
    for report, rows, rate in ((attn, 4, "tflops"), (norm, 8, "gbps"), (gelu, 8, "gbps")):
        out = report.write(tmp_path)
        assert (out / f"{report.name}.json").exists() and (out / f"{report.name}.md").exists()
        assert len(report.rows) == rows, report.rows
        assert all(r["ms"] is not None and r[rate] > 0 for r in report.rows), report.rows
