"""Flash attention (non-causal) forward and backward in Triton, FlashAttention-2 style.

    out = flash_attention(q, k, v, softmax_scale=None)     # q: (B, H, Nq, D); k, v: (B, H, Nk, D)

Preconditions (checked by the launcher, ValueError/TypeError otherwise):
  * q, k, v are 4-D (batch, heads, seq, head_dim) tensors of one dtype: float32, float16
    or bfloat16, on one CUDA device (or on the CPU when TRITON_INTERPRET=1);
  * head_dim is a multiple of 8 in [16, 128] (ViT: 32, 64, 80 for ViT-H/14, 128);
  * q, k, v share batch, heads and head_dim; k and v have the same shape; seq >= 1.
  Any strides are accepted (q, k, v are usually views of the qkv projection); a tensor
  whose last dim is not contiguous is copied once with .contiguous().

Design choices:
  * Any sequence length (197 tokens at 224 px, 577 at 384, 65 for the digits model):
    the last query/key block is masked, nothing is padded or copied.
  * head_dim that is not a power of 2 (80) runs in a BLOCK_D = next_power_of_2 tile with
    the tail columns masked to zero, which leaves every dot product unchanged.
  * Softmax statistics (running max, sum, log-sum-exp) are fp32 whatever the input dtype;
    the exponent is base 2 (exp2 is one instruction) with log2(e) folded into the scale.
    Forward saves lse (natural log, fp32, shape (B, H, Nq)) for the backward.
  * Backward = two launches of one kernel, a constexpr (DKDV) choosing the pass, no atomics
    (so bf16 gradients need no fp32 scratch): one program per query block accumulates dQ over all key blocks and, on the way, writes
    delta = rowsum(dO * O) (the usual preprocess pass, folded in); then one program per
    key block accumulates dK, dV over all query blocks. P is recomputed from q, k and
    lse, never stored: memory stays O(N), not O(N^2).
  * On a GPU, fp16/bf16 operands go straight to tl.dot (tensor cores, fp32 accumulate).
    The Triton CPU interpreter stores bf16 as raw bits, so there (and only there) the
    launcher sets the UPCAST constexpr and operands are cast to fp32 after each load.
  * fp32 inputs use exact ("ieee") products unless torch.backends.cuda.matmul.allow_tf32
    is set, matching what torch's own fp32 attention does.
  * Block sizes are autotuned on a GPU (key: seq lengths, head_dim, dtypes); fp32 inputs
    tune over smaller tiles of their own (the half-precision tiles spill registers in
    fp32). The interpreter cannot benchmark, so it gets a single config.
"""
import math

import torch
import triton
import triton.language as tl

from . import INTERPRETING, check_device

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs(gpu_choices, interp_choice=None):
    """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples; under the
    interpreter only interp_choice (none when it is None)."""
    choices = ([interp_choice] if interp_choice else []) if INTERPRETING else gpu_choices
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in choices]


# Forward: BLOCK_M queries per program, BLOCK_N keys per inner step.
_FWD_CONFIGS = _configs(
    [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 3)],
    (64, 64, 4, 1),
)
# Backward: for dK/dV, BLOCK_N keys per program and BLOCK_M queries per step; for dQ the reverse.
_BWD_CONFIGS = _configs(
    [(64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (32, 32, 4, 4)],
    (64, 64, 4, 1),
)
# fp32 operands multiply on the CUDA cores (exact products) or as tf32, with twice the bytes
# per element: ptxas spills registers in nearly every tile above for them (34-74 KB per
# thread block in the forward, tools/compile_kernels.py). These smaller tiles compile
# without spills for the forward and both backward kernels at head_dim 64.
_FWD_FP32_CONFIGS = _configs([(32, 32, 4, 2), (64, 32, 8, 2), (16, 32, 4, 2)])
_BWD_FP32_CONFIGS = _configs([(32, 32, 4, 2), (16, 32, 4, 2)])


def _by_dtype(fp32_configs):
    """early_config_prune: fp32 inputs tune over their own tiles, fp16/bf16 over the others
    (the autotuner's cache key includes the dtypes, so each keeps its own choice)."""
    fp32_ids = {id(c) for c in fp32_configs}

    def prune(configs, named_args, **kwargs):
        want_fp32 = named_args["Q"].dtype == torch.float32
        return [c for c in configs if (id(c) in fp32_ids) == want_fp32]
    return prune


_AUTOTUNE_KEY = ["N_Q", "N_KV", "HEAD_DIM"]


# Both backward passes tune over the same tiles; the pass (DKDV) is part of the key, so each
# keeps its own choice.
_bwd_autotune = triton.autotune(configs=_BWD_CONFIGS + _BWD_FP32_CONFIGS, key=_AUTOTUNE_KEY + ["DKDV"],
                                prune_configs_by={"early_config_prune": _by_dtype(_BWD_FP32_CONFIGS)})


@triton.jit
def _program_tile(N, BLOCK: tl.constexpr, H):
    """This program's (tile along N, batch*head index, batch, head): one flat grid axis, no 65535 limit."""
    pid = tl.program_id(0)
    num = (N + BLOCK - 1) // BLOCK
    pid_bh = pid // num
    return pid % num, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _tile_ptrs(base, off_b, off_h, rows, offs_d, sb, sh, sn, sd):
    """Pointers to a (rows, head_dim) tile of one batch and head of a (B, H, N, D) tensor."""
    return base + off_b * sb + off_h * sh + rows[:, None] * sn + offs_d[None, :] * sd


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # bf16 arithmetic under the interpreter needs fp32 (see the launcher)
        x = x.to(tl.float32)
    return x


@triton.jit
def _kv_scores(q, k_ptrs, v_ptrs, cols, mask_d, N_KV, qk_scale, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """A (keys, head_dim) tile of K and of V at rows ``cols`` (rows past N_KV read as zeros) and
    the scaled scores q @ k^T (log2 units) -> (k, v, scores, key mask)."""
    mask_n = cols < N_KV
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = _load(k_ptrs, kv_mask, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    return k, _load(v_ptrs, kv_mask, UPCAST), s, mask_n


@triton.autotune(configs=_FWD_CONFIGS + _FWD_FP32_CONFIGS, key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _by_dtype(_FWD_FP32_CONFIGS)})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, N_Q, N_KV, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_bh, off_b, off_h = _program_tile(N_Q, BLOCK_M, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < N_Q

    q = _load(_tile_ptrs(Q, off_b, off_h, offs_m, offs_d, sqb, sqh, sqn, sqd), mask_m[:, None] & mask_d[None, :], UPCAST)
    # Tile pointers are built once and advanced by BLOCK_N rows per step (cheap on a GPU,
    # and far fewer integer ops for the interpreter).
    k_ptrs = _tile_ptrs(K, off_b, off_h, offs_n, offs_d, skb, skh, skn, skd)
    v_ptrs = _tile_ptrs(V, off_b, off_h, offs_n, offs_d, svb, svh, svn, svd)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        k, v, s, mask_n = _kv_scores(q, k_ptrs, v_ptrs, start_n + offs_n, mask_d, N_KV, qk_scale, UPCAST, PRECISION)
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
        # Every key block holds at least one real key, so the row max stays finite.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(_tile_ptrs(O, off_b, off_h, offs_m, offs_d, sob, soh, son, sod), acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=mask_m)


@_bwd_autotune
@triton.jit
def _attn_bwd_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd, sgb, sgh, sgn, sgd,
    H, N_Q, N_KV, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, DKDV: tl.constexpr,
):
    """One of the two backward passes, chosen at compile time (each tunes and compiles apart).

    DKDV=False, the dQ pass, runs first: a program owns BLOCK_M queries and sweeps every key
    block (P recomputed), and also writes delta_i = sum_d dO_id * O_id (the softmax-Jacobian
    term) for its queries: no separate preprocess. DKDV=True: a program owns BLOCK_N keys and
    sweeps every query block, reading delta, so dK and dV are written once, with no atomics.
    The tensors a pass writes are fresh and contiguous, so one set of strides (sg*) serves them:
    dQ's (and O's, our own output shaped like dQ) in the dQ pass, dK's and dV's in the other.
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    if DKDV:
        # Work is laid out transposed ((keys, queries) tiles) to keep the products in the natural orientation.
        pid_n, pid_bh, off_b, off_h = _program_tile(N_KV, BLOCK_N, H)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        kv_mask = (offs_n[:, None] < N_KV) & mask_d[None, :]
        k = _load(_tile_ptrs(K, off_b, off_h, offs_n, offs_d, skb, skh, skn, skd), kv_mask, UPCAST)
        v = _load(_tile_ptrs(V, off_b, off_h, offs_n, offs_d, svb, svh, svn, svd), kv_mask, UPCAST)
        q_ptrs = _tile_ptrs(Q, off_b, off_h, offs_m, offs_d, sqb, sqh, sqn, sqd)
        do_ptrs = _tile_ptrs(DO, off_b, off_h, offs_m, offs_d, sdb, sdh, sdn, sdd)
        stat_base = pid_bh.to(tl.int64) * N_Q

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, N_Q, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < N_Q
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = _load(q_ptrs, q_mask, UPCAST)
            do = _load(do_ptrs, q_mask, UPCAST)
            q_ptrs += BLOCK_M * sqn
            do_ptrs += BLOCK_M * sdn
            lse2 = tl.load(LSE + stat_base + rows, mask=mask_m, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + stat_base + rows, mask=mask_m, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (keys, queries)
            p_t = tl.math.exp2(s_t - lse2[None, :])
            p_t = tl.where(mask_m[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

        dk = dk * sm_scale
        g_offs = _tile_ptrs(0, off_b, off_h, offs_n, offs_d, sgb, sgh, sgn, sgd)
        tl.store(DK + g_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)
    else:
        pid_m, pid_bh, off_b, off_h = _program_tile(N_Q, BLOCK_M, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = offs_m < N_Q
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(_tile_ptrs(Q, off_b, off_h, offs_m, offs_d, sqb, sqh, sqn, sqd), mask=q_mask, other=0.0)
        do = tl.load(_tile_ptrs(DO, off_b, off_h, offs_m, offs_d, sdb, sdh, sdn, sdd), mask=q_mask, other=0.0)
        o = tl.load(_tile_ptrs(O, off_b, off_h, offs_m, offs_d, sgb, sgh, sgn, sgd), mask=q_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        stat_base = pid_bh.to(tl.int64) * N_Q
        tl.store(DELTA + stat_base + offs_m, delta, mask=mask_m)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE + stat_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        k_ptrs = _tile_ptrs(K, off_b, off_h, offs_n, offs_d, skb, skh, skn, skd)
        v_ptrs = _tile_ptrs(V, off_b, off_h, offs_n, offs_d, svb, svh, svn, svd)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N_KV, BLOCK_N):
            k, v, s, mask_n = _kv_scores(q, k_ptrs, v_ptrs, start_n + offs_n, mask_d, N_KV, qk_scale, UPCAST,
                                         PRECISION)
            k_ptrs += BLOCK_N * skn
            v_ptrs += BLOCK_N * svn
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(mask_n[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

        dq = dq * sm_scale
        tl.store(_tile_ptrs(DQ, off_b, off_h, offs_m, offs_d, sgb, sgh, sgn, sgd), dq.to(DQ.dtype.element_ty),
                 mask=q_mask)


# ----------------------------------------------------------------------------- launchers


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"flash_attention: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    check_device("flash_attention", q.device)
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, h, n_q, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
        raise ValueError(
            f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, heads and head_dim")
    if d % 8 != 0 or not 16 <= d <= 128:
        raise ValueError(f"flash_attention: head_dim {d} unsupported; need a multiple of 8 in [16, 128] (e.g. 32, 64, 80, 128)")
    if n_q == 0 or k.shape[2] == 0 or b * h == 0:
        raise ValueError(f"flash_attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_flags(dtype):
    """(UPCAST, PRECISION): fp32 upcast only under the interpreter; input_precision only
    matters for fp32 operands ("tf32", Triton's default, is passed for fp16/bf16)."""
    upcast = INTERPRETING and dtype != torch.float32
    exact_fp32 = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return upcast, ("ieee" if exact_fp32 else "tf32")


def flash_attention_fwd(q, k, v, softmax_scale):
    """Launch the forward kernel; returns (out, lse) with out contiguous and lse fp32 (B, H, Nq)."""
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    out = torch.empty((b, h, n_q, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    upcast, precision = _kernel_flags(q.dtype)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, n_q, n_kv, softmax_scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), UPCAST=upcast, PRECISION=precision,
    )
    return out, lse


def flash_attention_bwd(do, q, k, v, out, lse, softmax_scale):
    """Launch the backward (dQ + delta, then dK/dV); returns contiguous (dq, dk, dv)."""
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    do = _last_dim_contiguous(do)
    block_d = max(16, triton.next_power_of_2(d))
    upcast, precision = _kernel_flags(q.dtype)

    delta = torch.empty_like(lse)
    assert out.is_contiguous()
    # Gradients are fresh contiguous tensors (q, k, v may be strided views of one qkv).
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision)
    tensors = (q, k, v, out, do, lse, delta, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride())
    scalars = (h, n_q, n_kv, softmax_scale * LOG2E, softmax_scale)
    # Order matters: the dQ pass writes delta, which the dK/dV pass reads. The sg* strides are
    # dQ's (and O's) in the first pass, dK's and dV's in the second.
    grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    _attn_bwd_kernel[grid_q](*tensors, *dq.stride(), *scalars, DKDV=False, **common)
    grid_kv = lambda meta: (triton.cdiv(n_kv, meta["BLOCK_N"]) * b * h,)  # noqa: E731
    _attn_bwd_kernel[grid_kv](*tensors, *dk.stride(), *scalars, DKDV=True, **common)
    return dq, dk, dv


# One autograd formula for both front doors: the eager autograd.Function and the custom op.
def _save(ctx, q, k, v, softmax_scale, out, lse):
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale


def _grads(ctx, do, bwd):
    """Grads of (q, k, v, softmax_scale); bwd is flash_attention_bwd or its custom op."""
    q, k, v, out, lse = ctx.saved_tensors
    return (*bwd(do, q, k, v, out, lse, ctx.softmax_scale), None)


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale):
        out, lse = flash_attention_fwd(q, k, v, softmax_scale)
        _save(ctx, q, k, v, softmax_scale, out, lse)
        return out

    @staticmethod
    def backward(ctx, do):
        return _grads(ctx, do, flash_attention_bwd)


# The same launchers as torch.library custom ops, for torch.compile: opaque to Dynamo (which
# cannot trace into Triton's launch machinery under the interpreter, nor every autotuner
# option on a GPU), with fake implementations for shapes and the autograd formula above.
# Only compiled code calls them: a custom op costs about 50 us of dispatch per call against
# 10 us for an autograd.Function (torch 2.13, CPU), some 4 ms per ViT-B/16 training step.
@torch.library.custom_op("vit_accel_kernels::flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attention_fwd(q, k, v, softmax_scale)


@_fwd_op.register_fake
def _(q, k, v, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("vit_accel_kernels::flash_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attention_bwd(do, q, k, v, out, lse, softmax_scale)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_fwd_op.register_autograd(lambda ctx, do, _dlse: _grads(ctx, do, _bwd_op),
                          setup_context=lambda ctx, inputs, output: _save(ctx, *inputs, *output))


def flash_attention(q, k, v, softmax_scale=None):
    """softmax(q @ k^T * scale) @ v for (batch, heads, seq, head_dim) tensors; differentiable.

    softmax_scale defaults to 1/sqrt(head_dim). Returns a contiguous tensor of q's dtype.
    Under torch.compile it runs as the custom op vit_accel_kernels::flash_attention_fwd;
    eagerly, as an autograd.Function (no dispatcher overhead per call).
    """
    _check_inputs(q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if torch.compiler.is_compiling():
        return _fwd_op(q, k, v, float(softmax_scale))[0]
    return FlashAttentionFunction.apply(q, k, v, float(softmax_scale))


def attention_ref(q, k, v, softmax_scale=None, upcast=True):
    """Pure-PyTorch attention: the CPU path and the test oracle.

    upcast=True computes in fp32 (returned in q's dtype); upcast=False computes in the
    input dtype op by op, i.e. PyTorch's own low-precision error, used to set tolerances.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * softmax_scale  # (B, H, Nq, Nk)
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(dtype)
