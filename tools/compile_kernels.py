"""Compile every Triton kernel ahead of time for an NVIDIA target, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not whether they
compile: layouts, tl.dot shapes, shared memory and register limits only show when Triton
lowers them for a real target. This script calls the real launchers (flash_attention_fwd,
flash_attention_bwd, layer_norm_fwd/bwd, bias_gelu_fwd/bwd) with CPU tensors of ViT's shapes
and strides, records each kernel launch instead of running it, and compiles it the way
Triton's runtime would on the GPU: the same argument specialization (strides equal to 1
become constants, 16-divisible sizes and pointers are marked so, which is what lets loads
vectorize), every autotune config, then PTX and ptxas (both ship inside the triton wheel,
no driver needed).

    python tools/compile_kernels.py --target cuda:90          # H100 / H200
    python tools/compile_kernels.py --target cuda:80 --quick  # A100, one config per kernel
    python tools/compile_kernels.py --json resources.json     # the table as a file too

Prints one line per compile: kernel, case, shared memory, registers per thread, spilled
bytes, the matrix instructions used (wgmma on Hopper, mma on Ampere) and exits 1 when a
kernel fails to compile, needs more shared memory than the target has, or a half-precision
attention kernel does not use tensor cores. Spills are reported, not failed: the autotuner
chooses among the configs on the GPU. Runs without TRITON_INTERPRET (it re-executes itself
without it when set) and in a fresh Triton cache (a cached kernel has no ptxas log).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # kernels must be real JITFunctions, not interpreted
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers and spills, read from the log
if "TRITON_CACHE_DIR" not in os.environ:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="vit-accel-compile-")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

# The compile path below reads Triton internals (knobs, ASTSource, make_backend, the Autotuner's
# pruning, the JIT's binder) whose names and signatures move between minor releases. It was
# checked on these; on any other version it stops rather than report a table it cannot trust.
KNOWN_TRITON = ("3.7", "3.8")
if ".".join(triton.__version__.split(".")[:2]) not in KNOWN_TRITON and not os.environ.get("VIT_ACCEL_ANY_TRITON"):
    sys.exit("compile_kernels: triton %s is not a version this tool knows (%s); its internals may have moved. "
             "Install one of those, or set VIT_ACCEL_ANY_TRITON=1 to try anyway and check the table by hand"
             % (triton.__version__, ", ".join(KNOWN_TRITON)))

from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from vit_accel_kernels import attention, bias_gelu, layer_norm  # noqa: E402

# Largest dynamic shared memory one block may use (bytes): sm_80 163 KB, sm_86/89 99 KB, sm_90 227 KB.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNELS = {
    "attn_fwd": attention._attn_fwd_kernel,
    "attn_bwd_dq": attention._attn_bwd_kernel,
    "attn_bwd_dkdv": attention._attn_bwd_kernel,
    "ln_fwd": layer_norm._layer_norm_fwd_kernel,
    "ln_bwd": layer_norm._layer_norm_bwd_kernel,
    "gelu_fwd": bias_gelu._bias_gelu_fwd_kernel,
    "gelu_bwd": bias_gelu._bias_gelu_bwd_kernel,
}
# Labels that name one pass of a kernel serving two: (constexpr, its value in that pass).
PASSES = {"attn_bwd_dq": ("DKDV", False), "attn_bwd_dkdv": ("DKDV", True)}


def label_of(kernel, kwargs) -> str:
    """The label of one launch: its kernel's, or its pass's where one kernel serves two."""
    for label, k in KERNELS.items():
        if k is kernel and (label not in PASSES or kwargs.get(PASSES[label][0]) == PASSES[label][1]):
            return label
    raise KeyError("a launch of %s matches no label" % kernel)


# (label, batch, heads, seq, head_dim): the models' attention shapes (batch only sets strides)
ATTENTION_SHAPES = [("vit-b16 224", 2, 12, 197, 64), ("vit-l16 384", 2, 16, 577, 64),
                    ("vit-h14 224", 2, 16, 257, 80), ("vit-s16 d32", 2, 12, 197, 32), ("d128", 2, 8, 197, 128)]
ROWS = 197 * 128  # tokens in a ViT-B/16 batch of 128 at 224 px


@contextlib.contextmanager
def recording():
    """Replace each kernel's run() with a recorder: launchers then queue (label, args, kwargs)
    instead of launching."""
    launches = []
    kernels = list({id(k): k for k in KERNELS.values()}.values())
    saved = [k.run for k in kernels]
    for kernel in kernels:
        kernel.run = (lambda kn: lambda *args, **kwargs: launches.append((label_of(kn, kwargs), args, kwargs)))(kernel)
    try:
        yield launches
    finally:
        for kernel, run in zip(kernels, saved):
            kernel.run = run


def launches(quick: bool):
    """Yield (label, case, args, kwargs) for every kernel launch the launchers make at ViT shapes."""
    with recording() as rec:
        shapes = ATTENTION_SHAPES[:1] if quick else ATTENTION_SHAPES
        for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)):
            for name, b, h, n, d in (shapes if dtype == torch.bfloat16 else shapes[:1]):
                # q, k, v as the model makes them: strided views of one (B, N, 3, H, D) projection
                q, k, v = torch.empty(b, n, 3, h, d, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
                out, lse = attention.flash_attention_fwd(q, k, v, d ** -0.5)
                attention.flash_attention_bwd(torch.empty_like(out), q, k, v, out, lse, d ** -0.5)
                for lb, args, kwargs in rec:
                    yield lb, "%s %s" % (NAMES[dtype], name), args, kwargs
                rec.clear()
        for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)):
            for n in ((768,) if quick else (192, 384, 768, 1024, 1280)):
                x = torch.empty(ROWS, n, dtype=dtype)
                w, bias = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
                y, hsum, mean, rstd = layer_norm.layer_norm_fwd(x, w, bias, 1e-6, residual=x)
                layer_norm.layer_norm_bwd(y, hsum, w, mean, rstd, dh=y)
                for lb, args, kwargs in rec:
                    yield lb, "%s N=%d" % (NAMES[dtype], n), args, kwargs
                rec.clear()
            x, bias = torch.empty(ROWS, 3072, dtype=dtype), torch.empty(3072, dtype=dtype)
            for approx in (("none",) if quick else ("none", "tanh")):
                bias_gelu.bias_gelu_bwd(bias_gelu.bias_gelu_fwd(x, bias, approx), x, bias, approx)
                for lb, args, kwargs in rec:
                    yield lb, "%s %s" % (NAMES[dtype], "erf" if approx == "none" else "tanh"), args, kwargs
                rec.clear()


def variants(label, args, kwargs, quick):
    """(config text, fn, kwargs) per configuration the runtime may compile for one launch."""
    kernel = KERNELS[label]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    if isinstance(kernel, Autotuner):
        kernel.nargs = dict(zip(kernel.arg_names, args))  # what the autotuner's own run() sets
        try:
            configs = kernel.prune_configs(kwargs)  # the configs it would time for these arguments
        finally:
            kernel.nargs = None
        for cfg in configs[:1] if quick else configs:
            text = "M=%d N=%d w=%d s=%d" % (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)
            yield text, kernel.fn, {**kwargs, **cfg.all_kwargs()}
    else:
        yield "w=%d" % kwargs.get("num_warps", 4), kernel, kwargs


def compile_launch(fn, args, kwargs, target):
    """Compile as JITFunction.run would (same binder, same specialization); returns the kernel
    and the ptxas log."""
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas log (TRITON_DUMP_PTXAS_LOG)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return kernel, log.getvalue()


def vector_width(kernel) -> int:
    """Widest global load in the PTX, in bits (128 = ld.global.v4.b32: fully vectorized)."""
    widths = [int(v or 1) * int(b) for v, b in re.findall(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.b(\d+)", kernel.asm["ptx"])]
    return max(widths, default=0)


_JOBS: list = []  # filled before the workers fork; a worker is given indices into it


def _compile_job(index: int, target_arch: int):
    label, case, config, fn, largs, kwargs = _JOBS[index]
    t0 = time.perf_counter()
    try:
        kernel, log = compile_launch(fn, largs, kwargs, GPUTarget("cuda", target_arch, 32))
    except Exception as e:  # a compile error is the finding: report it and go on
        return {"kernel": label, "case": case, "config": config, "error": "%s: %s" % (
            type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")}
    return {"kernel": label, "case": case, "config": config, "hash": kernel.metadata.hash, "log": log,
            "shared": int(getattr(kernel.metadata, "shared", 0)), "mma": tensor_cores(kernel),
            "vector_bits": vector_width(kernel), "seconds": round(time.perf_counter() - t0, 1)}


def tensor_cores(kernel) -> str:
    """Matrix instructions in the PTX: wgmma (Hopper), mma (Ampere and later) or - (none)."""
    ptx = kernel.asm["ptx"]
    return "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"


def check(row: dict, limit) -> list:
    """What is wrong with one compiled kernel, in words (empty: nothing)."""
    problems = []
    if limit is not None and row["shared"] > limit:
        problems.append("over the %d B of shared memory this target has" % limit)
    if row["kernel"].startswith("attn") and not row["case"].startswith("fp32") and row["mma"] == "-":
        problems.append("no tensor-core instructions in a half-precision attention kernel")
    if row["kernel"].startswith(("ln_", "gelu_")) and row["vector_bits"] < 128:
        problems.append("widest global load is %d bits, not 128: the loads did not vectorize" % row["vector_bits"])
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cuda:90", help="cuda:<compute capability>, e.g. cuda:90 (H100)")
    ap.add_argument("--quick", action="store_true", help="one shape, dtype and configuration per kernel")
    ap.add_argument("--only", default="", help="comma list of kernel labels (%s)" % ", ".join(KERNELS))
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    args = ap.parse_args(argv)
    backend, _, arch = args.target.partition(":")
    if backend != "cuda" or not arch.isdigit():
        ap.error("--target must look like cuda:90")
    only = {s for s in args.only.split(",") if s}
    if only - set(KERNELS):
        ap.error("unknown kernel label(s) %s; known: %s" % (", ".join(sorted(only - set(KERNELS))), ", ".join(KERNELS)))
    arch = int(arch)
    limit = SHARED_LIMIT.get(arch)
    for label, case, largs, lkwargs in launches(args.quick):
        if not only or label in only:
            _JOBS.extend((label, case, config, fn, largs, kwargs)
                         for config, fn, kwargs in variants(label, largs, lkwargs, args.quick))
    print("triton %s, target %s, %d compiles, %d at a time" % (triton.__version__, args.target, len(_JOBS), args.jobs),
          flush=True)
    indices = range(len(_JOBS))
    if args.jobs > 1:
        pool = multiprocessing.get_context("fork").Pool(args.jobs)
        results = pool.imap(functools.partial(_compile_job, target_arch=arch), indices)
    else:
        pool, results = None, (_compile_job(i, arch) for i in indices)
    results = list(results)  # in order; a kernel compiled twice has its ptxas log on one row only
    seen = {}
    for row in results:
        regs = re.search(r"Used (\d+) registers", row.get("log", ""))
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", row.pop("log", ""))
        if regs:
            seen[row["hash"]] = (int(regs.group(1)), int(spills.group(1)) + int(spills.group(2)) if spills else 0)
    failures = 0
    for row in results:
        if "error" in row:
            failures += 1
            print("FAIL %-14s %-18s %-20s %s" % (row["kernel"], row["case"], row["config"], row["error"]))
            continue
        row["regs"], row["spill"] = seen.get(row["hash"], (-1, -1))
        row["problems"] = check(row, limit)
        failures += bool(row["problems"])
        print("%s %-14s %-18s %-20s shared %6d B  regs %3d  spill %5d B  %-5s ld %3d b  %5.1fs%s" % (
            "FAIL" if row["problems"] else "ok  ", row["kernel"], row["case"], row["config"], row["shared"],
            row["regs"], row["spill"], row["mma"], row["vector_bits"], row["seconds"],
            "  (%s)" % "; ".join(row["problems"]) if row["problems"] else ""))
    if pool is not None:
        pool.close()
    print("%d of %d compiled for %s" % (len(results) - failures, len(results), args.target))
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "target": args.target, "rows": results}, indent=1))
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
