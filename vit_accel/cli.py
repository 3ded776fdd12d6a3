"""`vit-accel`: train, eval, predict, configs, report, convert, inspect, make-shards, plan, bench.

Errors a user can fix (a wrong key, a missing backend, a bad file) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from .config import ConfigError, check_trainable, find_config, list_configs, load_recipe
from .errors import BackendUnavailable, CheckpointWriteError, InputError

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
    if getattr(args, "print_config", False) and args.backend == "auto":
        return load_recipe(args.config, args.overrides)
    from .backends import resolve_backend

    args.backend = resolve_backend(args.backend)
    return load_recipe(args.config, args.overrides, backends=[args.backend])


def _say(text: str) -> None:
    """A line on stderr from rank 0 of a launch (every rank would say the same)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)


def cmd_train(args) -> int:
    recipe = _load_for_backend(args)
    if any(o.split("=", 1)[0].strip().startswith("pipeline.") for o in args.overrides):
        _say("vit-accel train: pipeline.* is read by `vit-accel plan` and the pipelining runner only; train does "
             "not pipeline (it trains data parallel; on IPUs the stages are ipu.splits), so it is ignored here")
    if args.print_config:
        print(recipe.to_yaml(), end="")
        return 0
    check_trainable(recipe)
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
    asked = args.backend
    recipe = _load_for_backend(args)
    if asked == "auto":
        _say(f"vit-accel eval: --backend auto chose {args.backend}")
    from .backends import create_backend
    from .checkpoints import load_pretrained, read
    from .engine.classeval import format_classes
    from .engine.resolve import resolve_for_eval
    from .engine.trainer import build_model, evaluate, val_message
    from .data import build_eval_loader
    from .engine import distributed

    src = read(args.checkpoint)  # once: the model section, the class names and the weights come from it
    resolved = resolve_for_eval(recipe, src)
    recipe = resolved.recipe
    backend = create_backend(args.backend, recipe)
    try:
        model = build_model(recipe, backend, class_names=resolved.class_names)
        report = load_pretrained(model, src)
        if distributed.is_main():
            print(f"loaded {args.checkpoint}: {report}")
        new_head = [d for d in report.dropped if d.startswith("head.weight") and "classes" in d]
        if new_head:
            raise ConfigError(f"{args.checkpoint}: {new_head[0].split(': ', 1)[1]}: evaluating would score an "
                              f"untrained head; set model.num_classes to the checkpoint's (or auto with its "
                              f"validation manifest)")
        if args.ema:
            from .engine.ema import load_ema_weights

            updates = load_ema_weights(model, args.checkpoint)
            if distributed.is_main():
                print(f"evaluating the EMA weights ({updates} updates)")
        backend.setup(model)
        # evaluation needs only the validation split (the bundled digits write both on first use)
        loader = build_eval_loader(recipe.data, recipe.model.img_size, backend.eval_batch_size,
                                   rank=distributed.rank(), world_size=distributed.world_size(), return_keys=True)
        res = evaluate(backend, recipe, loader, resolved.class_names)
        if distributed.is_main():
            print(json.dumps(res) if args.json else
                  f"{val_message(res)}  loss {res['val_loss']:.4f}  ({res['val_count']} images)\n"
                  + format_classes(res))
    finally:
        backend.close()
    return 0


def cmd_predict(args) -> int:
    import torch

    from .checkpoints import model_from_source, read
    from .data.transforms import eval_resize_size, eval_transform, normalize

    src = read(args.checkpoint)  # read once: weights, class names and a training run's preprocessing
    model, _ = model_from_source(src)
    model.eval()
    data = None
    if args.config:
        data = load_recipe(args.config, args.overrides).data.__dict__
    elif isinstance((src.hints.get("recipe") or {}).get("data"), dict):
        data = src.hints["recipe"]["data"]
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
        names = [model.cfg.class_name(i) for i in idx.tolist()]
        width = max(len(n) for n in names)
        print(path)
        for pi, name in zip(p.tolist(), names):
            print(f"  {name:<{width}}  {100 * pi:6.2f}%")
    return 0


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
    from .engine.classeval import format_classes
    from .engine.classplot import plot_confusion
    from .engine.runlog import format_summary, plot_curves, read_metrics

    rd = Path(args.run_dir)
    summary = rd / "summary.json"
    if not summary.exists():
        if not (rd / "metrics.jsonl").exists():
            raise ConfigError(f"{rd} is not a run directory (no summary.json or metrics.jsonl)")
        print(f"{rd}: run not finished (no summary.json); plotting what metrics.jsonl has")
        vals = [r for r in read_metrics(rd) if r.get("kind") == "val"]
        last = vals[-1] if vals else {}
    else:
        last = json.loads(summary.read_text())
        print(format_summary(last))
        last = dict(last, step=last.get("steps"))
    classes = format_classes(last)
    if classes:
        print(classes)
    print(f"curves: {plot_curves(rd)}")
    confusion = plot_confusion(rd, last)
    if confusion:
        print(f"confusion matrix: {confusion}")
    return 0


def _command(argv: List[str]) -> Optional[str]:
    """The sub-command argv names (its first word after the top-level options), or None."""
    words = iter(argv)
    for word in words:
        if word in ("--local_rank", "--local-rank"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole command line; given COMMAND, one of this module's own commands, the parser of the
    others (EXTERNAL_COMMANDS, whose modules load torch) is left out: `vit-accel configs` and a
    recipe's errors answer without loading torch. Any other command, or none, builds them all."""
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
                   help="read the --resume file (and a ZeRO run's .ds folder) with the full unpickler, which RUNS "
                        "ANY CODE the files name: only for a checkpoint you wrote yourself")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the recipe's validation split")
    _recipe_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (train.ema_momentum)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-5 classes of images, by name when the checkpoint has names")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--config", default=None, help="recipe for normalization (default: the checkpoint's)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("configs", help="list the recipes with the published numbers they reproduce")
    p.add_argument("--json", action="store_true", help="every recipe with its reproduces: block, as JSON")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("report", help="print a run's summary, per-class accuracy and most confident mistakes; "
                                      "redraw curves.png and confusion.png")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    if command in sub.choices:
        return parser
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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command(argv))
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
    """The `vit-accel` command (and `python -m vit_accel`): ``main`` then the exit code.

    Every way out of a process that loaded torch goes through ``end_process``, an exception escaping
    ``main`` too (its traceback is printed, exit code 1): after a process group, the interpreter's
    finalization is what aborts. A command that never loaded torch was never in a group.
    """
    try:
        code = main()
    except SystemExit as e:               # argparse, or sys.exit inside a command
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:               # the reader went away (`vit-accel configs | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush writes nowhere
        code = 141                        # what a shell reports for a pipe's writer
    except BaseException:                 # a defect: say where, then leave as every run does
        traceback.print_exc()
        code = 1
    if "torch" not in sys.modules:        # `configs`, a recipe's error: no torch, so no process group either
        sys.exit(code)
    from .engine import distributed

    distributed.end_process(code)


if __name__ == "__main__":
    entry()
