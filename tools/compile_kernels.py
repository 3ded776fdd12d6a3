"""Compile every Triton kernel ahead of time for an NVIDIA target, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not whether they
compile: layouts, tl.dot shapes, shared memory and register limits only show when Triton
lowers them for a real target. This script lowers each kernel to PTX and runs ptxas (both
ship inside the triton wheel, no driver needed) for the launch configurations the launchers
use: every attention autotune config in bf16 at head_dim 64 (ViT-B), the first config in
fp16 and fp32 and at head_dims 32, 80 (ViT-H/14) and 128; LayerNorm at the tiles its
launcher picks for hidden sizes 192 to 1280; bias+GELU for erf and tanh.

    python tools/compile_kernels.py --target cuda:90          # H100 / H200
    python tools/compile_kernels.py --target cuda:80 --quick  # A100, one config per kernel

Prints one line per compile (kernel, case, shared memory) and exits 1 when one fails or
needs more shared memory than the target has. Runs without TRITON_INTERPRET (it re-executes
itself without it when set).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # kernels must be real JITFunctions, not interpreted
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import attention, bias_gelu, layer_norm  # noqa: E402

# Largest dynamic shared memory one block may use (bytes): sm_80 163 KB, sm_86/89 99 KB, sm_90 227 KB.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FP32_POINTERS = {"LSE", "DELTA", "MEAN", "RSTD", "DW_PART", "DB_PART"}  # statistics and partial sums
FLOAT_SCALARS = {"eps", "qk_scale", "sm_scale"}
INT_SCALARS = {"M", "N", "H", "N_Q", "N_KV"}  # sizes, named in capitals like the pointers


def signature(fn, dtype: torch.dtype, constexprs: dict) -> dict:
    """Triton signature from the argument names: capitals are pointers (but the sizes), floats
    by name, other scalars i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name not in INT_SCALARS:
            sig[name] = "*fp32" if name in FP32_POINTERS else "*" + TRITON_TYPE[dtype]
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def compile_one(fn, dtype, constexprs, num_warps, num_stages, target):
    src = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs),
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def attention_cases(quick: bool):
    kernels = [("attn_fwd", attention._attn_fwd_kernel), ("attn_bwd_dq", attention._attn_bwd_dq_kernel),
               ("attn_bwd_dkdv", attention._attn_bwd_dkdv_kernel)]
    for label, tuner in kernels:
        configs = tuner.configs[:1] if quick else tuner.configs
        variants = [(torch.bfloat16, 64, c) for c in configs]
        first = tuner.configs[0]
        variants += [(torch.float16, 64, first), (torch.float32, 64, first)]
        variants += [(torch.bfloat16, d, first) for d in (32, 80, 128)]
        for dtype, d, cfg in variants:
            # the launcher's flags on a GPU: no upcast; ieee fp32 unless TF32 matmuls are allowed
            const = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), UPCAST=False,
                         PRECISION="ieee" if dtype == torch.float32 else "tf32", **cfg.kwargs)
            case = "%s d=%d M=%d N=%d w=%d s=%d" % (TRITON_TYPE[dtype], d, cfg.kwargs["BLOCK_M"],
                                                   cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)
            yield label, tuner.fn, dtype, const, cfg.num_warps, cfg.num_stages, case


def layer_norm_cases(quick: bool):
    widths = (768,) if quick else (192, 384, 768, 1024, 1280)
    for n in widths:
        block_m, block_n, warps = layer_norm._tile(n, 197 * 128)
        for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)):
            fwd = dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True)
            yield "ln_fwd", layer_norm._layer_norm_fwd_kernel, dtype, fwd, warps, 1, "%s N=%d" % (TRITON_TYPE[dtype], n)
            bwd = dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_WEIGHT=True, NEED_DW=True, NEED_DB=True, HAS_DH=True)
            yield "ln_bwd", layer_norm._layer_norm_bwd_kernel, dtype, bwd, warps, 1, "%s N=%d" % (TRITON_TYPE[dtype], n)


def bias_gelu_cases(quick: bool):
    for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)):
        for approx in ((False,) if quick else (False, True)):
            case = "%s %s" % (TRITON_TYPE[dtype], "tanh" if approx else "erf")
            yield ("gelu_fwd", bias_gelu._bias_gelu_fwd_kernel, dtype,
                   dict(BLOCK=bias_gelu._FWD_BLOCK, APPROX_TANH=approx), 4, 1, case)
            yield ("gelu_bwd", bias_gelu._bias_gelu_bwd_kernel, dtype,
                   dict(BLOCK_M=bias_gelu._BWD_BLOCK_M, BLOCK_N=bias_gelu._BWD_BLOCK_N, APPROX_TANH=approx,
                        NEED_DB=True), 4, 1, case)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cuda:90", help="cuda:<compute capability>, e.g. cuda:90 (H100)")
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel")
    ap.add_argument("--only", default="", help="comma list of kernel labels (attn_fwd, ln_bwd, gelu_fwd, ...)")
    args = ap.parse_args(argv)
    backend, _, arch = args.target.partition(":")
    if backend != "cuda" or not arch.isdigit():
        ap.error("--target must look like cuda:90")
    arch = int(arch)
    target = GPUTarget("cuda", arch, 32)
    limit = SHARED_LIMIT.get(arch)
    only = {s for s in args.only.split(",") if s}
    cases = [c for gen in (attention_cases, layer_norm_cases, bias_gelu_cases) for c in gen(args.quick)
             if not only or c[0] in only]
    print("triton %s, target %s, %d compiles" % (triton.__version__, args.target, len(cases)), flush=True)
    failures = 0
    for label, fn, dtype, const, warps, stages, case in cases:
        t0 = time.perf_counter()
        try:
            kernel = compile_one(fn, dtype, const, warps, stages, target)
        except Exception as e:  # a compile error is the finding: report it and go on
            failures += 1
            print("FAIL %-14s %-32s %s: %s" % (label, case, type(e).__name__, str(e).splitlines()[0][:200]), flush=True)
            continue
        shared = int(getattr(kernel.metadata, "shared", 0))
        over = limit is not None and shared > limit
        failures += over
        print("%s %-14s %-32s shared %7d B  %5.1fs%s" % (
            "FAIL" if over else "ok  ", label, case, shared, time.perf_counter() - t0,
            "  (over the %d B this target has)" % limit if over else ""), flush=True)
    print("%d of %d compiled for %s" % (len(cases) - failures, len(cases), args.target))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
