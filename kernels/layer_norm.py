"""LayerNorm forward and backward in Triton, with the pre-norm block's residual add fused.

    y = layer_norm(x, weight, bias, eps)                        # LayerNorm(x)
    y, h = layer_norm(x, weight, bias, eps, residual=r)         # h = x + r; y = LayerNorm(h)

Preconditions (checked by the launcher, ValueError/TypeError otherwise):
  * x is a floating tensor (float32, float16, bfloat16) of shape (..., N), N <= 8192
    (ViT: 192..1280); rows are any leading shape, flattened to (M, N);
  * weight and bias are (N,) floating tensors or None (any float dtype, e.g. fp32 master
    weights with bf16 activations); residual, if given, has x's shape and dtype;
  * everything on one CUDA device (or the CPU when TRITON_INTERPRET=1).
  Rows may be strided (last dim contiguous); otherwise x is copied once with .contiguous().

Design choices:
  * One row per program, BLOCK_N = next_power_of_2(N): a whole row sits in registers,
    so statistics need one read of the row. Statistics and all math are fp32.
  * With a residual, h is rounded to x's dtype before it is normalized: the stored h and
    the normalized h are then the same numbers, which is what the unfused
    `F.layer_norm(x + r)` does and what the backward (recomputing from the stored h) sees.
  * Backward: each program walks a group of rows, writes dx per row and keeps per-column
    partial sums of dweight and dbias in fp32 registers; the partials land in a
    (num_programs, N) fp32 buffer reduced by torch afterwards. No atomics (bf16-safe,
    deterministic). The grad of the residual is the grad of x (the add's Jacobian is the
    identity); the incoming grad of h is added to it in the same pass.
  * Output dtype is x's dtype (also under autocast, where torch's layer_norm gives fp32).
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_N = 8192  # a row must fit in one program's registers


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, H_OUT, MEAN, RSTD,
    stride_x, stride_r, stride_y, stride_h, N, eps,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = (x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    mean = tl.sum(x, 0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / N  # two-pass variance from registers: no cancellation
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DH, DX, DW_PART, DB_PART, MEAN, RSTD,
    stride_x, stride_dy, stride_dh, stride_dx, M, N, rows_per_program,
    BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    HAS_DH: tl.constexpr,
):
    # X holds what was normalized: x, or h when a residual was fused.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    # int64 loop bounds so row * stride cannot overflow for large M * N.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = dy
        if HAS_WEIGHT:
            wdy = dy * w
        c1 = tl.sum(xhat * wdy, 0) / N
        c2 = tl.sum(wdy, 0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * xhat
        if NEED_DB:
            db += dy
    if NEED_DW:
        tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    if NEED_DB:
        tl.store(DB_PART + pid * N + cols, db, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _rows(t, n):
    """View t as (M, N) with a contiguous last dim (copying only when it is not)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(block_n):
    return min(max(block_n // 256, 1), 8)


def _num_programs(device, m):
    """Row groups for the backward: enough to fill the GPU, few enough that the partial
    (num_programs, N) buffer stays small next to x."""
    if device.type == "cuda":
        return max(1, min(m, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(m, 8))


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
    want = "cpu" if INTERPRETING else "cuda"
    if x.device.type != want:
        where = "the CPU under TRITON_INTERPRET=1" if INTERPRETING else "a CUDA device (or set TRITON_INTERPRET=1 for CPU)"
        raise ValueError(f"layer_norm: tensors must be on {where}, got {x.device}")
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
        if residual.dtype != x.dtype:
            raise TypeError(f"layer_norm: residual dtype {residual.dtype} != x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"layer_norm: residual is on {residual.device}, x on {x.device}")


def layer_norm_fwd(x, weight, bias, eps, residual=None):
    """Launch the forward; returns (y, h_or_None, mean, rstd) with y, h shaped like x."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    h = torch.empty(x.shape, device=x.device, dtype=x.dtype) if residual is not None else None
    r2 = _rows(residual, n) if residual is not None else x2
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    block_n = triton.next_power_of_2(n)
    # Unused pointer slots get x: the constexpr flags keep them from being read.
    _layer_norm_fwd_kernel[(m,)](
        x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
        y, h if h is not None else y, mean, rstd,
        x2.stride(0), r2.stride(0), n, n, n, eps,
        BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, num_warps=_num_warps(block_n),
    )
    return y, h, mean, rstd


def layer_norm_bwd(dy, xin, weight, mean, rstd, dh=None, need_dw=True, need_db=True):
    """Launch the backward; xin is what was normalized (x or h). Returns (dx, dw, db) in fp32
    partial-sum precision, dw/db None where not needed."""
    n = xin.shape[-1]
    x2, dy2 = _rows(xin, n), _rows(dy, n)
    dh2 = _rows(dh, n) if dh is not None else dy2
    m = x2.shape[0]
    dx = torch.empty(xin.shape, device=xin.device, dtype=xin.dtype)
    programs = _num_programs(xin.device, m)
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)
    need_dw = need_dw and weight is not None
    dw_part = torch.empty((programs, n), device=xin.device, dtype=torch.float32) if need_dw else mean
    db_part = torch.empty((programs, n), device=xin.device, dtype=torch.float32) if need_db else mean
    block_n = triton.next_power_of_2(n)
    _layer_norm_bwd_kernel[(programs,)](
        x2, weight if weight is not None else x2, dy2, dh2, dx, dw_part, db_part, mean, rstd,
        x2.stride(0), dy2.stride(0), dh2.stride(0), n, m, n, rows_per_program,
        BLOCK_N=block_n, HAS_WEIGHT=weight is not None, NEED_DW=need_dw, NEED_DB=need_db,
        HAS_DH=dh is not None, num_warps=_num_warps(block_n),
    )
    return dx, (dw_part.sum(0) if need_dw else None), (db_part.sum(0) if need_db else None)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        y, h, mean, rstd = layer_norm_fwd(x, weight, bias, eps, residual)
        ctx.save_for_backward(h if h is not None else x, weight, mean, rstd)
        ctx.has_residual = residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # An unused h output arrives as None instead of a tensor of zeros to read.
        ctx.set_materialize_grads(False)
        return (y, h) if h is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        xin, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(xin)
        need = ctx.needs_input_grad
        dx, dw, db = layer_norm_bwd(dy, xin, weight, mean, rstd, dh, need_dw=need[1], need_db=need[2])
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(ctx.bias_dtype) if db is not None else None
        # d(x + r)/dr is the identity: the residual's grad is dx itself (as torch's add does).
        return dx, dw, db, (dx if ctx.has_residual else None), None


def layer_norm(x, weight, bias, eps=1e-6, residual=None):
    """LayerNorm over the last dim; with residual returns (LayerNorm(x + residual), x + residual)."""
    _check_inputs(x, weight, bias, residual)
    return LayerNormFunction.apply(x, weight, bias, residual, float(eps))


def layer_norm_ref(x, weight, bias, eps=1e-6, residual=None, upcast=True):
    """Pure-PyTorch (x [+ residual]) -> LayerNorm: the CPU path and the test oracle.

    upcast=True computes in fp32 and returns x's dtype; upcast=False stays in x's dtype.
    Returns y, or (y, h) when a residual is given.
    """
    dtype = x.dtype
    if upcast:
        x = x.float()
        residual = residual.float() if residual is not None else None
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    h = x + residual if residual is not None else x
    y = torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, eps).to(dtype)
    return (y, h.to(dtype)) if residual is not None else y
