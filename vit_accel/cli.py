"""`vit-accel`: train, eval, predict, configs, report, convert, inspect, make-shards, plan, bench.

Errors a user can fix (a wrong key, a missing backend, a bad file) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .config import ConfigError, find_config, list_configs, load_recipe
from .errors import InputError

# (module, function) pairs that register sub-commands living beside their code
EXTERNAL_COMMANDS = [
    ("vit_accel.checkpoints", "add_convert_parser"),
    ("vit_accel.checkpoints", "add_inspect_parser"),
    ("vit_accel.data", "add_make_shards_parser"),
    ("vit_accel.data", "add_bench_data_parser"),
    ("vit_accel.backends.pipeline_report", "add_plan_parser"),
    ("vit_accel.bench", "add_bench_parser"),
]


def _recipe_args(p: argparse.ArgumentParser, backend_default: str = "auto") -> None:
    p.add_argument("--config", default="vit-ti-digits", help="recipe name (configs/NAME.yaml) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable)")
    p.add_argument("--backend", default=backend_default, choices=["auto", "cpu", "gpu", "ipu"])


def _load_for_backend(args):
    """Resolve the backend first: the recipe's batch arithmetic is checked for that backend."""
    from .backends import resolve_backend

    if getattr(args, "print_config", False) and args.backend == "auto":
        return load_recipe(args.config, args.overrides)
    args.backend = resolve_backend(args.backend)
    return load_recipe(args.config, args.overrides, backends=[args.backend])


def cmd_train(args) -> int:
    recipe = _load_for_backend(args)
    if args.print_config:
        print(recipe.to_yaml(), end="")
        return 0
    from .engine.stop import EXIT_STOPPED, Stopped
    from .engine.trainer import train

    try:
        train(recipe, args.backend, run_dir=args.run_dir, resume=args.resume, progress=not args.no_progress,
              stop_after=args.stop_after, trust_checkpoint=args.trust_checkpoint)
    except Stopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"vit-accel: stopped by {e.signal_name} after step {e.step}; checkpoint {e.path}. Continue with "
                  f"the same command and --resume auto --run-dir {e.run_dir} (exit code {EXIT_STOPPED})",
                  file=sys.stderr, flush=True)
        return EXIT_STOPPED
    return 0


def cmd_eval(args) -> int:
    recipe = _load_for_backend(args)
    from .backends import create_backend
    from .checkpoints import load_pretrained
    from .engine.trainer import build_model, evaluate
    from .data import build_eval_loader
    from .engine import distributed

    backend = create_backend(args.backend, recipe)
    try:
        recipe.model.pretrained = ""
        model = build_model(recipe, backend)
        report = load_pretrained(model, args.checkpoint)
        if distributed.is_main():
            print(f"loaded {args.checkpoint}: {report}")
        if args.ema:
            from .engine.ema import load_ema_weights

            updates = load_ema_weights(model, args.checkpoint)
            if distributed.is_main():
                print(f"evaluating the EMA weights ({updates} updates)")
        backend.setup(model)
        # evaluation needs only the validation split (the bundled digits write both on first use)
        loader = build_eval_loader(recipe.data, recipe.model.img_size, backend.eval_batch_size,
                                   rank=distributed.rank(), world_size=distributed.world_size())
        res = evaluate(backend, recipe, loader)
        if distributed.is_main():
            print(json.dumps(res) if args.json else
                  f"val top-1 {100 * res['val_top1']:.2f}%  top-5 {100 * res['val_top5']:.2f}%  "
                  f"loss {res['val_loss']:.4f}  ({res['val_count']} images)")
    finally:
        backend.close()
    return 0


def cmd_predict(args) -> int:
    import torch

    from .checkpoints import model_from_checkpoint
    from .data.transforms import eval_resize_size, eval_transform, normalize

    model, _ = model_from_checkpoint(args.checkpoint)
    model.eval()
    data = None
    if args.config:
        data = load_recipe(args.config, args.overrides).data.__dict__
    else:
        payload = _training_payload(args.checkpoint)
        if payload and payload.get("recipe"):
            data = payload["recipe"]["data"]
    mean, std = (data["mean"], data["std"]) if data else ([127.5] * 3, [127.5] * 3)
    resize = eval_resize_size(model.cfg.img_size, data.get("eval_resize", 0), data.get("eval_crop_fraction", 0.0)) \
        if data else 0
    interpolation = (data.get("eval_interpolation") or data.get("interpolation", "bilinear")) if data else "bilinear"
    for path in args.images:
        with open(path, "rb") as f:
            hwc = eval_transform(f.read(), model.cfg.img_size, resize=resize, interpolation=interpolation)
        img = torch.from_numpy(hwc.copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            probs = model(normalize(img, mean, std)).softmax(-1)[0]
        k = min(args.top, probs.numel())
        p, idx = probs.topk(k)
        print(path)
        for pi, ii in zip(p.tolist(), idx.tolist()):
            print(f"  class {ii:>5d}  {100 * pi:6.2f}%")
    return 0


def _training_payload(path: str):
    """The dict of a vit-accel training checkpoint, else None (read like any checkpoint: no code runs)."""
    from .checkpoints.files import load_untrusted

    if Path(path).is_dir() or Path(path).suffix in (".safetensors", ".npz", ".json"):
        return None
    obj = load_untrusted(path)
    return obj if isinstance(obj, dict) and obj.get("format") == "vit-accel-train" else None


def recipe_summary(name: str) -> dict:
    """What ``vit-accel configs --json`` shows of a recipe: provenance, model, eval preprocessing."""
    from dataclasses import asdict

    r = load_recipe(name)
    d = r.data
    return {"description": r.description, "path": str(find_config(name)), "reproduces": asdict(r.reproduces),
            "model": {"name": r.model.name, "img_size": r.model.img_size, "num_classes": r.model.num_classes},
            "eval": {"resize": d.eval_resize, "crop_fraction": d.eval_crop_fraction,
                     "interpolation": d.eval_interpolation or d.interpolation, "mean": d.mean, "std": d.std}}


def cmd_configs(args) -> int:
    items = {name: recipe_summary(name) for name in list_configs()}
    if args.json:
        print(json.dumps(items, indent=2))
        return 0

    def num(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    width = max((len(k) for k in items), default=10)
    print(f"{'recipe':<{width}}  {'source':<12} {'res':>4} {'top-1':>6} {'top-5':>6} {'params M':>9}  published as")
    for name, it in items.items():
        rp = it["reproduces"]
        print(f"{name:<{width}}  {rp['source'] or '-':<12} {rp['resolution'] or it['model']['img_size']:>4} "
              f"{num(rp['top1']):>6} {num(rp['top5']):>6} {num(rp['params_m']):>9}  {rp['name'] or it['description']}")
    return 0


def cmd_report(args) -> int:
    from .engine.runlog import format_summary, plot_curves

    rd = Path(args.run_dir)
    summary = rd / "summary.json"
    if not summary.exists():
        if not (rd / "metrics.jsonl").exists():
            raise ConfigError(f"{rd} is not a run directory (no summary.json or metrics.jsonl)")
        print(f"{rd}: run not finished (no summary.json); plotting what metrics.jsonl has")
    else:
        print(format_summary(json.loads(summary.read_text())))
    out = plot_curves(rd)
    print(f"curves: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-accel", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe")
    _recipe_args(p)
    p.add_argument("--run-dir", default=None, help="run directory (default runs/RECIPE-BACKEND-TIME)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="a checkpoint to continue from, or 'auto' (the latest in the run directory)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read the --resume file with the full unpickler, which RUNS ANY CODE the file names: "
                        "only for an older checkpoint you wrote yourself")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the recipe's validation split")
    _recipe_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (train.ema_momentum)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-5 classes of images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--config", default=None, help="recipe for normalization (default: the checkpoint's)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("configs", help="list the recipes with the published numbers they reproduce")
    p.add_argument("--json", action="store_true", help="every recipe with its reproduces: block, as JSON")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("report", help="print a run's summary and redraw curves.png")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    for module, fn in EXTERNAL_COMMANDS:
        try:
            getattr(importlib.import_module(module), fn)(sub)
        except (ImportError, AttributeError) as e:  # a part not installed: say so when used
            name = fn[len("add_"):-len("_parser")].replace("_", "-")
            q = sub.add_parser(name, help=f"(unavailable: {e})")
            q.set_defaults(func=lambda a, e=e, name=name: _unavailable(name, e))
    return parser


def _unavailable(name: str, e: Exception) -> int:
    print(f"vit-accel {name}: unavailable in this installation ({e})", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    from .backends import BackendUnavailable
    from .engine.saving import CheckpointWriteError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, BackendUnavailable, FileNotFoundError, FloatingPointError, CheckpointWriteError) as e:
        if os.environ.get("RANK", "0") == "0":  # every rank of a launch fails alike: say it once
            print(f"vit-accel: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("vit-accel: interrupted; resume with --resume auto --run-dir RUN_DIR", file=sys.stderr)
        return 130
    except InputError as e:  # a checkpoint or data a rank cannot use: every rank says why
        print(f"vit-accel: error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `vit-accel` command (and `python -m vit_accel`): ``main`` then the exit code."""
    from .engine import distributed

    distributed.end_process(main())


if __name__ == "__main__":
    entry()
