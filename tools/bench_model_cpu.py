"""CPU throughput of vit-accel's ViT against HF transformers' and timm's ViT of the same size (random init).

Forward (inference, no_grad) and forward+backward (training step without the optimizer) images/s,
for vit-accel attn_impl eager and sdpa, transformers attn_implementation eager and sdpa, and
timm (fused SDPA attention; built as `vit-accel bench` builds it, ``bench.timm_vit``: our exact
architecture) where it is installed; all get the same weights first. The providers run
interleaved, one timed repetition each per round, so drift in machine load hits all of them
alike; the table reports the median over rounds.

    python tools/bench_model_cpu.py --model vit-b16 --batch 8 --iters 3 --rounds 5

Not a test: run it by hand. Numbers depend on the CPU, its load and torch's thread count.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from vit_accel.model import count_macs, create_vit, vit_config


def build_providers(name: str, img: int, num_classes: int):
    # HF's default LayerNorm eps is 1e-12; every provider uses it so all compute the same function.
    cfg = vit_config(name, img_size=img, num_classes=num_classes, layer_norm_eps=1e-12)
    providers = {}
    for impl in ("eager", "sdpa"):
        providers["vit-accel " + impl] = create_vit(name, img_size=img, num_classes=num_classes,
                                                    attn_impl=impl, layer_norm_eps=1e-12)
    try:
        from vit_accel.bench import timm_vit

        providers["timm"] = timm_vit(cfg)   # timm's VisionTransformer, our exact architecture (as vit-accel bench)
    except ImportError:
        print("timm is not installed: no timm provider")
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: no transformers providers")
        return cfg, providers
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.ViTConfig(hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                                    num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_hidden,
                                    image_size=img, patch_size=cfg.patch_size, num_labels=num_classes)
    for impl in ("eager", "sdpa"):
        try:
            m = transformers.ViTForImageClassification._from_config(hf_cfg, attn_implementation=impl)
        except (ValueError, ImportError) as e:  # an implementation this version does not offer
            print("transformers %s: skipped (%s)" % (impl, e))
            continue
        assert m.config._attn_implementation == impl, m.config._attn_implementation
        providers["transformers " + impl] = _HFLogits(m)
    return cfg, providers


def check_same_function(providers, img: int) -> None:
    """Give every provider one set of weights (HF's through the checkpoint key map, else ours; timm
    reads our keys as they are) and compare logits, so the timings compare one function computed
    several ways."""
    from vit_accel.checkpoints.formats import hf_to_timm

    hf = [p for p, m in providers.items() if isinstance(m, _HFLogits)]
    hf_sd = providers[hf[0]].model.state_dict() if hf else None
    sd = hf_to_timm(hf_sd) if hf else providers["vit-accel sdpa"].state_dict()
    for m in providers.values():
        if isinstance(m, _HFLogits):
            m.model.load_state_dict(hf_sd)
        else:
            m.load_state_dict(sd)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        outs = {p: m.eval()(x) for p, m in providers.items()}
    ref = outs[hf[0] if hf else "vit-accel sdpa"]
    worst = max((o - ref).abs().max().item() for o in outs.values())
    print("max |logit difference| between providers: %.2e" % worst)
    assert worst < 1e-3, "providers compute different functions"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "-"


class _HFLogits(torch.nn.Module):
    """Calls the HF model like ours: images in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def time_once(model, x, y, backward: bool, iters: int) -> float:
    """Seconds per iteration over ``iters`` iterations."""
    t = time.perf_counter()
    for _ in range(iters):
        if backward:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        else:
            with torch.no_grad():
                model(x)
    return (time.perf_counter() - t) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-b16")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per repetition")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; the median is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, providers = build_providers(args.model, args.img, 1000)
    check_same_function(providers, args.img)
    x = torch.randn(args.batch, 3, args.img, args.img)
    y = torch.randint(0, 1000, (args.batch,))
    print("%s  img %d  batch %d  torch %s  transformers %s  timm %s  threads %d  %s" % (
        args.model, args.img, args.batch, torch.__version__, _version("transformers"), _version("timm"),
        torch.get_num_threads(),
        platform.processor() or platform.machine()))
    times = {(p, mode): [] for p in providers for mode in ("fwd", "fwd+bwd")}
    for mode in ("fwd", "fwd+bwd"):
        for m in providers.values():  # warm-up: allocator, oneDNN primitive caches
            m.train(mode == "fwd+bwd")
            time_once(m, x, y, mode == "fwd+bwd", 1)
        for r in range(args.rounds):
            for p, m in providers.items():
                m.train(mode == "fwd+bwd")  # dropout rates are 0: train() only enables autograd paths
                times[(p, mode)].append(time_once(m, x, y, mode == "fwd+bwd", args.iters))
    ref = "transformers sdpa" if "transformers sdpa" in providers else next(iter(providers))
    flops = 2 * count_macs(cfg)
    print("\n%-20s %8s %10s %9s   speed-up vs %s" % ("provider", "mode", "images/s", "GFLOP/s", ref))
    for mode in ("fwd", "fwd+bwd"):
        base = statistics.median(times[(ref, mode)])
        for p in providers:
            med = statistics.median(times[(p, mode)])
            mult = 1 if mode == "fwd" else 3  # backward ~ 2x forward
            print("%-20s %8s %10.2f %9.1f   %.2fx" % (
                p, mode, args.batch / med, mult * flops * args.batch / med / 1e9, base / med))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
