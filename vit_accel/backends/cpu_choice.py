"""What ``cpu.precision`` and ``cpu.compile`` resolve to, and why (the CPU backend prints both at start).

    cpu.precision  auto: bf16 autocast where the CPU computes bf16 natively (``avx512_bf16`` or
                   ``amx_bf16`` in torch.cpu.get_capabilities()), fp32 where it does not (oneDNN
                   would convert bf16 to fp32 and run slower than fp32). DeepSpeed has no autocast
                   (its bf16 trains bf16 weights), so under ZeRO auto stays fp32.
    cpu.compile    auto: torch.compile the training forward/backward when the run repays the
                   compile: its training work (3 x forward FLOPs x images of this process, the
                   schedule's steps) takes at least ``AUTO_COMPILE_SECONDS`` at the CPU's peak
                   (cpu_features.peak). Measured on the 2-core build machine (bf16): the embedded
                   default's step takes 0.120 s compiled and 0.180 s eager, a cold compile 26 s and a
                   cached one (inductor's on-disk caches) 1.7 s, so a cold compile repays itself after
                   about 430 of its steps, 31 s of work at that CPU's peak; shorter runs (tests, smoke
                   runs) stay eager. Without a working C++ compiler every setting runs eager and says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import Recipe, vit_options
from . import cpu_features

AUTO_COMPILE_SECONDS = 30.0


@dataclass
class Choice:
    value: str           # "bf16" / "fp32", or "true" / "false"
    reason: str          # one clause: why


def choose_precision(setting: str, zero: bool) -> Choice:
    if setting != "auto":
        return Choice(setting, "cpu.precision")
    if zero:
        return Choice("fp32", "auto: DeepSpeed has no autocast (its bf16 trains bf16 weights; set cpu.precision=bf16 "
                              "for that)")
    feature = cpu_features.native_bf16()
    if feature:
        return Choice("bf16", f"auto: bf16 autocast, this CPU computes bf16 natively ({feature} in "
                              f"torch.cpu.get_capabilities())")
    return Choice("fp32", "auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in "
                          "torch.cpu.get_capabilities()), where bf16 runs slower than fp32")


def run_work(recipe: Recipe, world_size: int) -> Optional[float]:
    """FLOPs of the run's training steps on one process (3 x forward per image), None when the
    schedule counts epochs (its length needs the data; such runs are long)."""
    from ..model import count_macs, vit_config

    if recipe.schedule.epochs > 0:
        return None
    per_image = 3 * 2 * count_macs(vit_config(recipe.model.name, **vit_options(recipe.model)))
    images = recipe.schedule.total_steps * recipe.train.global_batch_size / max(world_size, 1)
    return per_image * images


def choose_compile(setting: str, recipe: Recipe, precision: str, world_size: int, zero: bool) -> Choice:
    if setting == "false":
        return Choice("false", "cpu.compile")
    if zero:
        return Choice("false", f"{'auto' if setting == 'auto' else 'cpu.compile=true is not applied'}: DeepSpeed ZeRO "
                               "(distributed.zero_stage >= 0) runs its own step, eager on the CPU")
    choice = Choice("true", "cpu.compile") if setting == "true" else _auto_compile(recipe, precision, world_size)
    problem = cpu_features.compiler_problem() if choice.value == "true" else None
    if problem:
        return Choice("false", f"{problem}; training runs eager. To compile, install a C++ compiler (g++ or clang++) "
                               f"or point $CXX at one")
    return choice


def _auto_compile(recipe: Recipe, precision: str, world_size: int) -> Choice:
    work = run_work(recipe, world_size)
    if work is None:
        return Choice("true", "auto: the schedule counts epochs, a run long enough to repay the compile")
    pk = cpu_features.peak(precision)
    gflops = pk.gflops or cpu_features.cores() * 2.0 * 32   # unknown peak: 2 GHz AVX2
    seconds = work / (gflops * 1e9)
    what = (f"the run's {work / 1e12:.1f} TFLOP of training take {seconds:.0f} s at this CPU's "
            f"{'peak' if pk.gflops else 'assumed peak'} {gflops:.0f} GFLOP/s")
    if seconds < AUTO_COMPILE_SECONDS:
        return Choice("false", f"auto: {what}, under the {AUTO_COMPILE_SECONDS:.0f} s that repay a compile")
    return Choice("true", f"auto: {what}, enough to repay the compile")
