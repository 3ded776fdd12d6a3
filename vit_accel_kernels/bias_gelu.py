"""Bias add + GELU (the ViT MLP's fc1 epilogue) forward and backward in Triton.

    y = bias_gelu(x, bias, approximate="none")     # gelu(x + bias), x: (..., N), bias: (N,)

Preconditions (checked by the launcher, ValueError/TypeError otherwise):
  * x is float32, float16 or bfloat16 with shape (..., N); bias is a floating (N,) tensor
    (any float dtype, e.g. fp32 master weights with bf16 activations);
  * approximate is "none" (exact erf GELU: timm, HF) or "tanh" (the JAX/BERT form);
  * both on one CUDA device (or the CPU when TRITON_INTERPRET=1).
  A non-contiguous x is copied once with .contiguous() (fc1's output is contiguous).

Design choices:
  * Forward is a flat elementwise kernel (bias column = offset % N): one read of x, one
    write of y, math in fp32.
  * Only x (pre-bias) and bias are saved; the backward recomputes u = x + bias, which is
    cheaper than storing u or gelu'(u).
  * Backward tiles (rows, columns): each program walks a group of rows for one column
    block, writes dx and keeps a fp32 column sum of dx, stored as a partial row of a
    (row_groups, N) fp32 buffer; torch sums it (dbias). No atomics (bf16-safe,
    deterministic).
  * tanh(z) is computed as 2 * sigmoid(2z) - 1: libdevice tanh is not available in the
    Triton CPU interpreter, and the sigmoid form is exact enough (its cancellation near
    0 is multiplied by u, which is then small too).
"""

import torch
import triton
import triton.language as tl

from . import INTERPRETING, check_device

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
APPROXIMATIONS = ("none", "tanh")


@triton.jit
def _gelu_and_grad(u, APPROX_TANH: tl.constexpr):
    """(gelu(u), gelu'(u)) in fp32."""
    if APPROX_TANH:
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)  # sqrt(2/pi) * (u + c u^3)
        # tanh(z) is +-1 in fp32 beyond |z| ~ 9; clamping keeps exp(-2z) finite.
        z = tl.minimum(tl.maximum(z, -20.0), 20.0)
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        y = 0.5 * u * (1.0 + t)
        dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * u * u)
        dy = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * dz
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))  # Phi(u)
        y = u * cdf
        dy = cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)  # Phi(u) + u * phi(u)
    return y, dy


@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, numel, N, BLOCK: tl.constexpr, APPROX_TANH: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(BIAS + offs % N, mask=mask, other=0.0).to(tl.float32)
    y, _ = _gelu_and_grad(x + b, APPROX_TANH)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    X, BIAS, DY, DX, DB_PART, M, N, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr, NEED_DB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    b = tl.load(BIAS + cols, mask=mask_n, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid_m.to(tl.int64) * rows_per_program  # int64: rows * N may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & mask_n[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        _, grad = _gelu_and_grad(x + b[None, :], APPROX_TANH)
        dx = tl.where(mask, dy * grad, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DB:
            db += tl.sum(dx, 0)
    if NEED_DB:
        tl.store(DB_PART + pid_m * N + cols, db, mask=mask_n)


# ----------------------------------------------------------------------------- launchers

# Elementwise block: large in the interpreter, where each program costs Python overhead.
_FWD_BLOCK = 8192 if INTERPRETING else 1024
_BWD_BLOCK_M, _BWD_BLOCK_N = (32, 256) if INTERPRETING else (16, 128)


def _check_inputs(x, bias, approximate):
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"bias_gelu: approximate={approximate!r}; expected one of {APPROXIMATIONS}")
    if not isinstance(x, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise TypeError("bias_gelu: x and bias must be torch.Tensors")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bias_gelu: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if not bias.is_floating_point():
        raise TypeError(f"bias_gelu: bias must be floating, got {bias.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"bias_gelu: x must be a non-empty tensor of shape (..., N), got {tuple(x.shape)}")
    if tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias shape {tuple(bias.shape)} != ({x.shape[-1]},) (the last dim of x)")
    if bias.device != x.device:
        raise ValueError(f"bias_gelu: bias is on {bias.device}, x on {x.device}")
    check_device("bias_gelu", x.device)


def bias_gelu_fwd(x, bias, approximate):
    """Launch the forward on a contiguous x; returns y shaped like x."""
    y = torch.empty_like(x)
    numel = x.numel()
    _bias_gelu_fwd_kernel[(triton.cdiv(numel, _FWD_BLOCK),)](
        x, bias, y, numel, x.shape[-1], BLOCK=_FWD_BLOCK, APPROX_TANH=approximate == "tanh", num_warps=4)
    return y


def bias_gelu_bwd(dy, x, bias, approximate, need_db=True):
    """Launch the backward on contiguous x; returns (dx, dbias as fp32 or None)."""
    dy = dy.contiguous()
    n = x.shape[-1]
    m = x.numel() // n
    dx = torch.empty_like(x)
    col_blocks = triton.cdiv(n, _BWD_BLOCK_N)
    if x.device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 8
    row_blocks = triton.cdiv(m, _BWD_BLOCK_M)
    groups = max(1, min(row_blocks, triton.cdiv(target, col_blocks)))
    rows_per_program = triton.cdiv(row_blocks, groups) * _BWD_BLOCK_M
    groups = triton.cdiv(m, rows_per_program)
    db_part = torch.empty((groups, n), device=x.device, dtype=torch.float32) if need_db else dx
    _bias_gelu_bwd_kernel[(groups, col_blocks)](
        x, bias, dy, dx, db_part, m, n, rows_per_program,
        BLOCK_M=_BWD_BLOCK_M, BLOCK_N=_BWD_BLOCK_N, APPROX_TANH=approximate == "tanh", NEED_DB=need_db,
        num_warps=4,
    )
    return dx, (db_part.sum(0) if need_db else None)


# One autograd formula for both front doors: the eager autograd.Function and the custom op.
def _save(ctx, x, bias, approximate):
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _grads(ctx, dy, bwd):
    """Grads of (x, bias, approximate); bwd is bias_gelu_bwd or its custom op."""
    x, bias = ctx.saved_tensors
    need_db = ctx.needs_input_grad[1]
    dx, db = bwd(dy, x, bias, ctx.approximate, need_db)
    return dx, (db.to(bias.dtype) if need_db else None), None


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        _save(ctx, x, bias, approximate)
        return bias_gelu_fwd(x, bias, approximate)

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, bias_gelu_bwd)


# The launchers as torch.library custom ops, for torch.compile (see kernels/attention.py).
@torch.library.custom_op("vit_accel_kernels::bias_gelu_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    return bias_gelu_fwd(x, bias, approximate)


@_fwd_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x)


@torch.library.custom_op("vit_accel_kernels::bias_gelu_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, approximate: str,
            need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, db = bias_gelu_bwd(dy, x, bias, approximate, need_db)
    return dx, (db if db is not None else x.new_empty(0, dtype=torch.float32))  # custom ops return tensors


@_bwd_op.register_fake
def _(dy, x, bias, approximate, need_db):
    return torch.empty_like(x), x.new_empty(bias.shape if need_db else (0,), dtype=torch.float32)


_fwd_op.register_autograd(lambda ctx, dy: _grads(ctx, dy, _bwd_op),
                          setup_context=lambda ctx, inputs, output: _save(ctx, *inputs))


def bias_gelu(x, bias, approximate="none"):
    """gelu(x + bias) over the last dim of x; differentiable in x and bias. Under
    torch.compile it runs as the custom op vit_accel_kernels::bias_gelu_fwd."""
    _check_inputs(x, bias, approximate)
    if torch.compiler.is_compiling():
        return _fwd_op(x.contiguous(), bias.contiguous(), approximate)
    return BiasGeluFunction.apply(x.contiguous(), bias.contiguous(), approximate)


def bias_gelu_ref(x, bias, approximate="none", upcast=True):
    """Pure-PyTorch gelu(x + bias): the CPU path and the test oracle.

    upcast=True computes in fp32 and returns x's dtype; upcast=False stays in x's dtype.
    """
    dtype = x.dtype
    u = x.float() + bias.float() if upcast else x + bias.to(dtype)
    return torch.nn.functional.gelu(u, approximate=approximate).to(dtype)
