"""LayerNorm forward and backward in Triton, with the pre-norm block's residual add fused.

    y = layer_norm(x, weight, bias, eps)                        # LayerNorm(x)
    y, h = layer_norm(x, weight, bias, eps, residual=r)         # h = x + r; y = LayerNorm(h)

Preconditions (checked by the launcher, ValueError/TypeError otherwise):
  * x is a floating tensor (float32, float16, bfloat16) of shape (..., N), N <= 8192
    (ViT: 192..1280); rows are any leading shape, flattened to (M, N);
  * weight and bias are (N,) floating tensors or None (any float dtype, e.g. fp32 master
    weights with bf16 activations); residual, if given, has x's shape and a supported
    dtype, possibly not x's (an fp32 residual stream under autocast): h is returned in
    the residual's dtype, y in x's;
  * everything on one CUDA device (or the CPU when TRITON_INTERPRET=1).
  Rows may be strided (last dim contiguous); otherwise x is copied once with .contiguous().

Design choices:
  * Whole rows per program, BLOCK_N = next_power_of_2(N): a row sits in registers, so
    statistics need one read of it. Short rows (N = 192) would leave most of a program
    idle, so a program takes BLOCK_M rows (a ~4096-element tile). All math is fp32.
  * With a residual, h is rounded to its dtype before it is normalized: the stored h and
    the normalized h are then the same numbers, which is what the unfused
    `F.layer_norm(x + r)` does and what the backward (recomputing from the stored h) sees.
  * Backward: each program walks a group of rows, writes dx and keeps per-column
    partial sums of dweight and dbias in fp32 registers; the partials land in a
    (num_programs, N) fp32 buffer reduced by torch afterwards. No atomics (bf16-safe,
    deterministic). The grad of the residual is the grad of x (the add's Jacobian is the
    identity); the incoming grad of h is added to it in the same pass.
  * Output dtype is x's dtype (also under autocast, where torch's layer_norm gives fp32).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import INTERPRETING, check_device

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_N = 8192  # a row must fit in one program's registers


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, H_OUT, MEAN, RSTD,
    stride_x, stride_r, stride_y, stride_h, M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # A (BLOCK_M rows, whole row) tile per program; statistics reduce along axis 1.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    mask = mask_m[:, None] & mask_n[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    mean = tl.sum(x, 1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / N  # two-pass variance from registers: no cancellation
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + rows, mean, mask=mask_m)
    tl.store(RSTD + rows, rstd, mask=mask_m)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DH, DX, DW_PART, DB_PART, MEAN, RSTD,
    stride_x, stride_dy, stride_dh, stride_dx, M, N, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, HAS_DH: tl.constexpr,
):
    # X holds what was normalized: x, or h when a residual was fused. Each program walks
    # rows_per_program rows (a multiple of BLOCK_M) in (BLOCK_M, BLOCK_N) tiles.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # 2-D accumulators, reduced over rows once at the end rather than once per tile.
    dw = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        mask = mask_m[:, None] & mask_n[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy
        if HAS_WEIGHT:
            wdy = dy * w
        c1 = tl.sum(xhat * wdy, 1) / N
        c2 = tl.sum(wdy, 1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * xhat
        if NEED_DB:
            db += dy
    if NEED_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw, 0), mask=mask_n)
    if NEED_DB:
        tl.store(DB_PART + pid * N + cols, tl.sum(db, 0), mask=mask_n)


# ----------------------------------------------------------------------------- launchers


def _rows(t, n):
    """View t as (M, N) with a contiguous last dim (copying only when it is not)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _tile(n, m):
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, several per program when rows are short.

    On a GPU a tile holds about 4096 elements (BLOCK_M = 16 at N = 192, 4 at 768, 2 at
    1280); the interpreter pays per program, so it takes up to 64 rows at once.
    """
    block_n = triton.next_power_of_2(n)
    cap = 64 if INTERPRETING else max(1, 4096 // block_n)
    block_m = min(cap, triton.next_power_of_2(m))
    return block_m, block_n, min(max(block_m * block_n // 512, 1), 8)


def _num_programs(device, m, block_m):
    """Row groups for the backward: enough to fill the GPU, few enough that the partial
    (num_programs, N) buffers stay small next to x."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(m, block_m), target))


def _check_inputs(x, weight, bias, residual):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"layer_norm: x must be a non-empty tensor of shape (..., N), got {tuple(x.shape)}")
    n = x.shape[-1]
    if n > MAX_N:
        raise ValueError(f"layer_norm: hidden size {n} > {MAX_N} does not fit one program's row")
    check_device("layer_norm", x.device)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"layer_norm: {name} must be a floating tensor or None")
        if tuple(p.shape) != (n,):
            raise ValueError(f"layer_norm: {name} shape {tuple(p.shape)} != ({n},) (the last dim of x)")
        if p.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {p.device}, x on {x.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"layer_norm: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm: residual has dtype {residual.dtype}; supported: float32, float16, bfloat16")
        if residual.device != x.device:
            raise ValueError(f"layer_norm: residual is on {residual.device}, x on {x.device}")


def layer_norm_fwd(x, weight, bias, eps, residual=None):
    """Launch the forward; returns (y, h_or_None, mean, rstd) with y, h shaped like x."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    h = torch.empty(x.shape, device=x.device, dtype=residual.dtype) if residual is not None else None
    r2 = _rows(residual, n) if residual is not None else x2
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    block_m, block_n, num_warps = _tile(n, m)
    # Unused pointer slots get x: the constexpr flags keep them from being read.
    _layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
        y, h if h is not None else y, mean, rstd,
        x2.stride(0), r2.stride(0), n, n, m, n, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, num_warps=num_warps,
    )
    return y, h, mean, rstd


def layer_norm_bwd(dy, xin, weight, mean, rstd, dh=None, need_dw=True, need_db=True):
    """Launch the backward; xin is what was normalized (x or h). Returns (dx, dw, db):
    dx in xin's dtype (the grad of h when a residual was fused), dw/db fp32 sums or None."""
    n = xin.shape[-1]
    x2, dy2 = _rows(xin, n), _rows(dy, n)
    dh2 = _rows(dh, n) if dh is not None else dy2
    m = x2.shape[0]
    dx = torch.empty(xin.shape, device=xin.device, dtype=xin.dtype)
    block_m, block_n, num_warps = _tile(n, m)
    programs = _num_programs(xin.device, m, block_m)
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    need_dw = need_dw and weight is not None
    dw_part = torch.empty((programs, n), device=xin.device, dtype=torch.float32) if need_dw else mean
    db_part = torch.empty((programs, n), device=xin.device, dtype=torch.float32) if need_db else mean
    _layer_norm_bwd_kernel[(programs,)](
        x2, weight if weight is not None else x2, dy2, dh2, dx, dw_part, db_part, mean, rstd,
        x2.stride(0), dy2.stride(0), dh2.stride(0), n, m, n, rows_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_WEIGHT=weight is not None, NEED_DW=need_dw, NEED_DB=need_db,
        HAS_DH=dh is not None, num_warps=num_warps,
    )
    return dx, (dw_part.sum(0) if need_dw else None), (db_part.sum(0) if need_db else None)


# One autograd formula for both front doors: the eager autograd.Function and the custom op.
# Both take (x, weight, bias, eps, residual).
def _save(ctx, x, weight, bias, eps, residual, h, mean, rstd):
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _grads(ctx, dy, dh, bwd):
    """Grads of (x, weight, bias, eps, residual); bwd is layer_norm_bwd or its custom op.
    dy or dh may be None (an output that was not used)."""
    xin, weight, mean, rstd = ctx.saved_tensors
    _, need_dw, need_db, _, _ = ctx.needs_input_grad
    need_dw = need_dw and weight is not None
    if dy is None:
        dy = torch.zeros_like(xin)
    dx, dw, db = bwd(dy, xin, weight, mean, rstd, dh if ctx.has_residual else None, need_dw, need_db)
    dw = dw.to(weight.dtype) if need_dw else None
    db = db.to(ctx.bias_dtype) if need_db else None
    if not ctx.has_residual:
        return dx, dw, db, None, None
    # dx is the grad of h, in h's dtype. d(x + r)/dx = d(x + r)/dr = identity: both
    # inputs get it (the same tensor, as torch's add does), cast to x's dtype if needed.
    return dx.to(ctx.x_dtype), dw, db, None, dx


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual):
        y, h, mean, rstd = layer_norm_fwd(x, weight, bias, eps, residual)
        _save(ctx, x, weight, bias, eps, residual, h, mean, rstd)
        # An unused h output arrives as None instead of a tensor of zeros to read.
        ctx.set_materialize_grads(False)
        return (y, h) if h is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        return _grads(ctx, dy, dh, layer_norm_bwd)


# The launchers as torch.library custom ops, for torch.compile (see kernels/attention.py).
# Custom ops return tensors only: an absent h / dw / db is an empty tensor.
@torch.library.custom_op("vit_accel_kernels::layer_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
            residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = layer_norm_fwd(x, weight, bias, eps, residual)
    return y, (h if h is not None else x.new_empty(0)), mean, rstd


@_fwd_op.register_fake
def _(x, weight, bias, eps, residual):
    m = x.numel() // x.shape[-1]
    h = x.new_empty(x.shape, dtype=residual.dtype) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), h, x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("vit_accel_kernels::layer_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, xin: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
            rstd: torch.Tensor, dh: Optional[torch.Tensor], need_dw: bool,
            need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = layer_norm_bwd(dy, xin, weight, mean, rstd, dh, need_dw, need_db)
    empty = mean.new_empty(0)
    return dx, (dw if dw is not None else empty), (db if db is not None else empty)


@_bwd_op.register_fake
def _(dy, xin, weight, mean, rstd, dh, need_dw, need_db):
    n = xin.shape[-1]
    dw = mean.new_empty(n if need_dw and weight is not None else 0)
    return torch.empty_like(xin), dw, mean.new_empty(n if need_db else 0)


_fwd_op.register_autograd(lambda ctx, dy, dh, _dmean, _drstd: _grads(ctx, dy, dh, _bwd_op),
                          setup_context=lambda ctx, inputs, output: _save(ctx, *inputs, *output[1:]))


def layer_norm(x, weight, bias, eps=1e-6, residual=None):
    """LayerNorm over the last dim; with residual returns (LayerNorm(x + residual), x + residual).
    Under torch.compile it runs as the custom op vit_accel_kernels::layer_norm_fwd."""
    _check_inputs(x, weight, bias, residual)
    if torch.compiler.is_compiling():
        y, h, _, _ = _fwd_op(x, weight, bias, float(eps), residual)
        return (y, h) if residual is not None else y
    return LayerNormFunction.apply(x, weight, bias, float(eps), residual)


def layer_norm_ref(x, weight, bias, eps=1e-6, residual=None, upcast=True):
    """Pure-PyTorch (x [+ residual]) -> LayerNorm: the CPU path and the test oracle.

    upcast=True computes in fp32; upcast=False in the inputs' (promoted) dtype. Returns y
    in x's dtype, or (y, h) with h in the residual's dtype when a residual is given.
    """
    dtype, h_dtype = x.dtype, (residual.dtype if residual is not None else None)
    if upcast:
        x = x.float()
        residual = residual.float() if residual is not None else None
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    h = x + residual if residual is not None else x
    y = torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, eps).to(dtype)
    return (y, h.to(h_dtype)) if residual is not None else y
