"""The trainer: one loop for every backend.

    recipe -> resolved (auto: classes from the data, the model from its file) -> backend
           -> model (+ pretrained) -> loaders -> [resume] -> steps -> eval -> summary

Exact resume: a checkpoint holds model, optimizer, step, data position and RNG states, and
the dropout RNG is re-seeded from (seed, rank, step) every step, so a run killed at any point
and resumed from its last checkpoint ends with the same weights as one never interrupted.
A stop signal (train.stop_signals) checkpoints the step in flight and raises ``Stopped``
(engine/stop.py); checkpoints count once complete (engine/saving.py); a checkpoint resumes on
another number of processes (the sample order is the loader's streams, not the world size).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import Backend, create_backend  # the trainer is the one engine module that builds a backend
from ..config import ConfigError, Recipe, vit_options
from ..model import ViT, create_vit
from . import distributed
from .classeval import ClassTally, check_labels, top_k
from .ema import ModelEMA, check_ema_backend, ema_parameters
from .mixing import micro_batch_mix
from .optim import check_optim_backend
from .resolve import Resolved, resolve_recipe
from .rundir import (check_resumable, completed_summary, last_logged, redone_steps, run_dir_and_checkpoint,
                     save_checkpoint, set_rng_state)
from .runlog import RunLog, format_summary, plot_curves, write_schedule
from .saving import read_marker, writing
from .schedule import build_schedule, needs_train_samples
from .stop import StopSignals, Stopped

# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

def build_model(recipe: Recipe, backend: Optional[Backend] = None, log=print, class_names=(),
                pretrained=None) -> ViT:
    """The recipe's ViT with the backend's ops and the data's class names; loads ``model.pretrained``
    when given (``pretrained``: that file already read, a checkpoints.Source)."""
    opts = vit_options(recipe.model)
    if backend is not None:
        opts.update(backend.model_options())
    model = create_vit(recipe.model.name, class_names=tuple(class_names), **opts)
    if recipe.model.pretrained:
        from ..checkpoints import load_pretrained

        report = load_pretrained(model, pretrained or recipe.model.pretrained, format=recipe.model.pretrained_format)
        log(f"pretrained weights: {report}")
    return model


def data_specs(recipe: Recipe) -> Tuple[str, str]:
    """Train and validation shard specs; the bundled digits are written on first use."""
    from ..data import shard_specs

    train, val = shard_specs(recipe.data)
    if not train:
        raise ConfigError("data.train_shards is empty: point it at webdataset shards "
                          "(--set data.train_shards=/path/train-{000000..000099}.tar), "
                          "or write some with `vit-accel make-shards`")
    return train, val


def _with_shards(recipe: Recipe, train: str, val: str):
    from dataclasses import replace

    return replace(recipe.data, train_shards=train, val_shards=val)


def evaluate(backend: Backend, recipe: Recipe, loader: Iterable, class_names=()) -> Dict[str, Any]:
    """Top-1, top-k (k = min(5, classes): key ``val_topK``), loss and per-class results (classeval.py)
    over the validation split, summed over every process. Batches may carry sample keys (the
    most confident mistakes are named by them)."""
    classes = int(recipe.model.num_classes)
    k = min(5, classes)
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct-k, loss_sum, count
    tally = ClassTally(classes)
    for batch in _in_lockstep(loader, recipe.model.img_size):
        images, labels, keys = batch if len(batch) == 3 else (batch[0], batch[1], None)
        logits = backend.eval_step(images)
        if labels is None:  # a rank out of data keeps pace (ZeRO-3 gathers weights in every forward)
            continue
        check_labels(labels, classes, keys, where="data.val_shards")
        top = logits.topk(k, dim=1).indices
        hit = top == labels.view(-1, 1)
        sums += torch.tensor([hit[:, :1].sum().item(), hit.sum().item(),
                              F.cross_entropy(logits, labels, reduction="sum").item(), labels.numel()],
                             dtype=torch.float64)
        tally.add(logits, labels, keys)
    sums = distributed.all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    out = {"val_top1": sums[0].item() / n, f"val_top{k}": sums[1].item() / n, "val_loss": sums[2].item() / n,
           "val_count": int(sums[3].item())}
    out.update(tally.reduce(class_names))
    bad = bad_samples(getattr(loader, "stats", None))
    if bad["count"]:
        out.update(val_bad_samples=bad["count"], val_bad_examples=bad["examples"])
    return out


def _in_lockstep(loader: Iterable, img_size: int):
    """The loader's batches, then (one blank image, None) until every rank is done.

    Ranks hold different numbers of validation batches when shards split unevenly; each forward
    under ZeRO-3 is collective, so every rank makes as many calls as the busiest one.
    """
    if not distributed.is_distributed():
        yield from loader
        return
    it = iter(loader)
    while True:
        batch = next(it, None)
        busy = distributed.all_reduce_sum(torch.tensor([0.0 if batch is None else 1.0], dtype=torch.float64))
        if busy[0].item() == 0:
            return
        yield batch if batch is not None else (torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8), None, None)


def bad_samples(stats, since: int = 0) -> Dict[str, Any]:
    """Bad samples skipped on every rank: total count and (key, shard, reason) examples after ``since``.

    Collective when several processes run (every rank calls it at the same point).
    """
    count = int(stats.bad) if stats is not None else 0
    mine = [list(e) for e in stats.examples[since:]] if stats is not None else []
    if distributed.is_distributed():
        count = int(distributed.all_reduce_sum(torch.tensor([count], dtype=torch.float64))[0].item())
        mine = [e for rank in distributed.all_gather_object(mine) for e in rank]
    return {"count": count, "examples": [{"key": k, "shard": sh, "reason": why} for k, sh, why in mine]}


def evaluate_with_ema(backend: Backend, recipe: Recipe, loader_fn, ema: Optional[ModelEMA],
                      class_names=()) -> Dict[str, Any]:
    """``evaluate`` on the trained weights and, with an EMA, on the EMA weights (keys ``ema_*``)."""
    val = evaluate(backend, recipe, loader_fn(), class_names)
    if ema is not None:
        with ema.swapped_in(ema_parameters(backend)):
            val.update({"ema_" + k: v for k, v in evaluate(backend, recipe, loader_fn(), class_names).items()})
    return val


def val_message(val: Dict[str, Any]) -> str:
    """``val top-1 ...%  top-K ...%`` of an evaluation (K = min(5, classes))."""
    k, acc = top_k(val)
    return f"val top-1 {100 * val['val_top1']:.2f}%" + (f"  top-{k} {100 * acc:.2f}%" if acc is not None else "")


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2 ** 63)


def versions() -> Dict[str, str]:
    from .. import __version__

    out = {"vit_accel": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "deepspeed", "poptorch", "webdataset"):
        m = __import__("sys").modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = str(m.__version__)
    return out


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

@dataclass
class _Run:
    """What the steps of one run share: where they start, what they read, what they count."""
    recipe: Recipe
    backend: Backend
    run_dir: Path
    schedule: Any
    train_loader: Any
    val_loader: Callable[[], Iterable]
    ema: Optional[ModelEMA]
    say: Callable[[str], None]
    class_names: Tuple[str, ...] = ()
    step: int = 0
    skips: Dict[str, int] = field(default_factory=lambda: {"total": 0, "in_a_row": 0})  # fp16 steps skipped
    train_time: float = 0.0
    images_done: int = 0
    stop: Optional[StopSignals] = None   # the stop signals caught while the steps run
    saved_step: int = -1                 # the step of the last checkpoint written
    resumed: Optional[Dict[str, Any]] = None   # the "resume" record for metrics.jsonl


def train(recipe: Recipe, backend_name: str = "auto", run_dir: Optional[str] = None,
          resume: Optional[str] = None, progress: bool = True, stop_after: Optional[int] = None,
          trust_checkpoint: bool = False) -> Dict[str, Any]:
    """Train ``recipe`` on a backend; returns the summary (also written to summary.json).

    ``resume``: a checkpoint path, or "auto" for the latest in the run directory; it is read by the
    strict unpickler unless ``trust_checkpoint`` (the full unpickler, which runs the code a file names).
    ``stop_after``: end after this step (for tests and partial runs); checkpoints as usual.
    """
    resolved = resolve_recipe(recipe)  # num_classes from the data, a variant from model.pretrained
    backend = create_backend(backend_name, resolved.recipe)
    try:
        return _train_on(backend, resolved, run_dir, resume, progress, stop_after, trust_checkpoint)
    finally:  # devices and the process group are released on success and on error alike
        backend.close()


def _train_on(backend: Backend, resolved: Resolved, run_dir: Optional[str], resume: Optional[str], progress: bool,
              stop_after: Optional[int], trust_checkpoint: bool) -> Dict[str, Any]:
    recipe = resolved.recipe
    check_optim_backend(recipe.optim, backend.name)
    check_ema_backend(recipe, backend.name)
    main = distributed.is_main()
    say = (lambda s: print(s, flush=True)) if main else (lambda s: None)
    say(f"vit-accel: backend {backend.name} ({distributed.world_size()} process(es)), recipe {recipe.name}")
    rd, ckpt_path = run_dir_and_checkpoint(recipe, backend.name, run_dir, resume, say)

    torch.manual_seed(recipe.train.seed)
    backend.setup(build_model(recipe, backend, log=say, class_names=resolved.class_names,
                              pretrained=resolved.pretrained))
    run = _start_run(recipe, backend, rd, say)
    run.class_names = tuple(resolved.class_names)
    if resolved.class_names:
        say(f"classes: {len(resolved.class_names)} ({', '.join(resolved.class_names[:10])}"
            f"{', ...' if len(resolved.class_names) > 10 else ''})")
    say(run.train_loader.describe())
    if ckpt_path is not None:
        _restore(run, ckpt_path, trust_checkpoint)
    # a feed that reads ahead: checkpoints take its position (of the batches it handed out)
    run.train_loader = backend.wrap_train_loader(run.train_loader)

    total = run.schedule.total_steps
    end = min(total, stop_after) if stop_after else total
    done = completed_summary(rd, run.step, total)
    if done is not None:
        say(f"run already complete: step {run.step} of schedule.total_steps {total}; nothing to train. "
            f"Its summary ({rd / 'summary.json'}):")
        say(format_summary(done))
        return done
    say(f"run directory {rd}; {backend.batch_per_call} images per call x {distributed.world_size()} process(es); "
        f"global batch {recipe.train.global_batch_size}; steps {run.step} -> {end}; schedule {run.schedule.describe()}")
    log = RunLog(rd, total, run.step, enabled=main, progress=progress)
    if main:
        (rd / "recipe.yaml").write_text(recipe.to_yaml())
        write_schedule(rd, run.schedule)   # curves.png draws the rate of every step from it

    if run.resumed is not None:
        log.write(run.resumed)
    t_start = time.time()
    with writing(recipe.train.async_checkpoint), StopSignals(recipe.train.stop_signals) as run.stop:
        last_loss = _run_steps(run, log, end)
        return _finish(run, log, last_loss, t_start)


def _start_run(recipe: Recipe, backend: Backend, rd: Path, say) -> _Run:
    """EMA, schedule and loaders for a backend that is set up."""
    ema = ModelEMA(recipe.train.ema_momentum, ema_parameters(backend)) if recipe.train.ema_momentum else None
    train_spec, val_spec = data_specs(recipe)
    from ..data import build_eval_loader, build_train_loader, resolve_shards

    samples = resolve_shards(train_spec).num_samples if needs_train_samples(recipe.schedule) else None
    schedule = build_schedule(recipe.schedule, recipe.optim.lr, recipe.train.global_batch_size, samples)
    data_cfg = _with_shards(recipe, train_spec, val_spec)
    img = recipe.model.img_size
    rank, world = distributed.rank(), distributed.world_size()
    train_loader = build_train_loader(data_cfg, img, backend.batch_per_call, seed=recipe.train.seed,
                                      rank=rank, world_size=world, log=say)

    def val_loader():  # with sample keys: the report names the most confident mistakes by them
        return build_eval_loader(data_cfg, img, backend.eval_batch_size, rank=rank, world_size=world,
                                 return_keys=True)

    return _Run(recipe, backend, rd, schedule, train_loader, val_loader, ema, say)


def _restore(run: _Run, ckpt_path: Path, trust: bool) -> None:
    """Weights, optimizer, step, data position, RNG states and EMA from a checkpoint (of any world size)."""
    from ..data import DataError, ResumeMismatch

    marker = read_marker(ckpt_path)
    if marker is not None:   # checked before any weight is read
        check_resumable(run.recipe, _as_recipe_dict(marker.get("recipe") or {}), ckpt_path, run.run_dir)
    state = run.backend.load_state(ckpt_path, trust=trust)
    check_resumable(run.recipe, state.get("recipe") or {}, ckpt_path, run.run_dir)
    run.step = int(state["step"])
    run.skips.update(state.get("skipped_steps") or {})
    try:
        run.train_loader.load_state_dict(state["data"])
    except ResumeMismatch as e:
        raise ConfigError(f"--resume {ckpt_path}: the data settings changed since the checkpoint "
                          f"({'; '.join(e.changes)}). Resume with the settings the run started with "
                          f"(they are in {run.run_dir / 'recipe.yaml'}): the order of samples depends on them") from None
    except DataError as e:
        raise ConfigError(f"--resume {ckpt_path}: {e}") from None
    if state.get("rng"):
        set_rng_state(state["rng"])
    if run.ema is not None and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    elif run.ema is not None:
        run.say(f"{ckpt_path} has no EMA: the EMA restarts from the resumed weights")
    run.saved_step = run.step
    run.resumed = _resume_record(run, ckpt_path, state, marker)


def _as_recipe_dict(values: Dict[str, Any]) -> Dict[str, Any]:
    """A marker's flat ``section.key`` values as a recipe dict."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return out


def _resume_record(run: _Run, ckpt_path: Path, state: Dict[str, Any], marker: Optional[Dict[str, Any]]):
    """Say what the resume continues and what it redoes; the record metrics.jsonl gets."""
    redone, last = redone_steps(run.run_dir, run.step)
    was = (marker or {}).get("world_size") or (state.get("deepspeed") or {}).get("world_size")
    world = distributed.world_size()
    run.say(f"resumed from {ckpt_path} at step {run.step}"
            + (f"; {redone} step(s) redone (the interrupted attempt had reached step {last})" if redone else "")
            + (f"; written on {was} process(es), continuing on {world}: the same global batch "
               f"{run.recipe.train.global_batch_size}, {run.backend.batch_per_call} images per process and call"
               if was and was != world else ""))
    return {"kind": "resume", "step": run.step, "checkpoint": Path(ckpt_path).name, "redone_steps": redone,
            "world_size": world, "checkpoint_world_size": was or world}


def _run_steps(run: _Run, log: RunLog, end: int) -> float:
    """Train from ``run.step`` to ``end``: log, evaluate and checkpoint on the recipe's cadence.

    Returns the mean training loss of the last logged window.
    """
    recipe, backend, t = run.recipe, run.backend, run.recipe.train
    seed, rank, world, spc = t.seed, distributed.rank(), distributed.world_size(), backend.steps_per_call
    num_classes = int(recipe.model.num_classes)
    batches = iter(run.train_loader)
    mix = micro_batch_mix(recipe, backend, rank)   # each micro-batch mixed on its own, as the sources mix
    window_loss, window_n, last_loss = 0.0, 0, float("nan")
    bad_logged = len(getattr(getattr(run.train_loader, "stats", None), "examples", []))
    try:
        while run.step < end:
            step = run.step
            images, labels = next(batches)
            check_labels(labels, num_classes)
            # Seeded after the fetch: starting DataLoader workers draws from torch's RNG, and that
            # happens at a different step in a resumed run.
            torch.manual_seed(_step_seed(seed, rank, step))
            lr = run.schedule.lr(step)
            if mix is not None:  # on the host, before normalization (affine, so the same as after), for every backend
                images, labels = mix(images, labels, step)
            t0 = time.perf_counter()
            result = backend.train_step(images, labels, lr)
            dt = time.perf_counter() - t0
            _count_skip(run.skips, result, step, lr, t.max_skipped_steps)
            if run.ema is not None:
                run.ema.update(ema_parameters(backend))
            run.step = step = step + spc
            run.train_time += dt
            run.images_done += images.shape[0] * world
            if np.isfinite(result.loss):  # a skipped fp16 step may carry an inf/nan loss
                window_loss += result.loss
                window_n += 1
            log.advance(spc, _postfix(result, lr, images.shape[0] * world / max(dt, 1e-9), run.skips["total"]))
            if step % t.log_every < spc or step >= end:
                last_loss = _mean_over_processes(window_loss, window_n)
                bad_logged = _log_train(run, log, result, lr, last_loss, bad_logged)
                window_loss, window_n = 0.0, 0
            if t.eval_every and step % t.eval_every < spc and step < end:
                val = evaluate_with_ema(backend, recipe, run.val_loader, run.ema, run.class_names)
                _record_val(run, log, dict(kind="val", step=step, **val))
                log.message(f"step {step}: {val_message(val)}")
            if t.checkpoint_every and step % t.checkpoint_every < spc and step < end:
                _save(run, step)
            _stop_if_signalled(run, step)
    finally:  # stop the loader's workers (and a read-ahead thread) now, not at interpreter exit
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return last_loss


def _mean_over_processes(total: float, n: int) -> float:
    """The window's mean training loss over every process (each saw its share of the global batch)."""
    sums = distributed.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64))
    return sums[0].item() / sums[1].item() if sums[1].item() else float("nan")


def _save(run: _Run, step: int) -> Path:
    run.saved_step = step
    return save_checkpoint(run.backend, run.recipe, run.run_dir, step, run.train_loader, ema=run.ema, skips=run.skips,
                           class_names=run.class_names)


def _stop_if_signalled(run: _Run, step: int) -> None:
    """After a step: if any process got a stop signal, checkpoint this step (once) and raise Stopped."""
    name = run.stop.agreed() if run.stop is not None else None
    if name is None:
        return
    path = run.run_dir / "checkpoints" / f"step_{step:07d}.pt"
    if run.saved_step != step:
        path = _save(run, step)
    raise Stopped(name, step, path, run.run_dir)


def _postfix(result, lr: float, images_per_second: float, skipped: int) -> Dict[str, str]:
    """The progress bar's numbers for one call."""
    post = {"loss": f"{result.loss:.4f}", "lr": f"{lr:.3g}", "img/s": f"{images_per_second:.0f}"}
    if skipped:
        post["skipped"] = str(skipped)
    return post


def _log_train(run: _Run, log: RunLog, result, lr: float, loss: float, bad_logged: int) -> int:
    """Write a train record (window loss, rate, bad samples since the last one); returns the new mark."""
    stats = getattr(run.train_loader, "stats", None)
    rec = {"kind": "train", "step": run.step, "loss": loss, "lr": lr,
           "images_per_second": run.images_done / max(run.train_time, 1e-9), "skipped_steps": run.skips["total"]}
    if result.grad_norm is not None:
        rec["grad_norm"] = result.grad_norm
    bad = bad_samples(stats, since=bad_logged)
    if bad["count"]:
        rec.update(bad_samples=bad["count"], bad_examples=bad["examples"])
    log.write(rec)
    return len(getattr(stats, "examples", []))


def _finish(run: _Run, log: RunLog, last_loss: float, t_start: float) -> Dict[str, Any]:
    """Final checkpoint, evaluation and summary (written to summary.json by the main process)."""
    recipe, backend, rd, step = run.recipe, run.backend, run.run_dir, run.step
    if run.saved_step != step:
        _save(run, step)
    val = evaluate_with_ema(backend, recipe, run.val_loader, run.ema, run.class_names)
    _record_val(run, log, dict(kind="val", step=step, **val))
    log.close()
    bad = bad_samples(getattr(run.train_loader, "stats", None))
    if run.images_done == 0:  # resumed at the end of the schedule, before summary.json was written
        last_loss, ips = last_logged(rd)
    else:
        ips = run.images_done / max(run.train_time, 1e-9)
    summary = {
        "recipe": recipe.name, "backend": backend.name, "world_size": distributed.world_size(),
        "run_dir": str(rd), "steps": step, "global_batch_size": recipe.train.global_batch_size,
        "val_top1": val["val_top1"], "val_loss": val["val_loss"],
        "train_loss": last_loss, "images_per_second": ips,
        "wall_seconds": time.time() - t_start, "versions": versions(),
        "bad_samples": bad["count"], "bad_examples": bad["examples"],
        "val_bad_samples": val.get("val_bad_samples", 0), "val_bad_examples": val.get("val_bad_examples", []),
        "skipped_steps": run.skips["total"],
    }
    summary.update({k: v for k, v in val.items() if k.startswith("ema_") or k.startswith("val_top") or k in CLASS_KEYS})
    if distributed.is_main():
        (rd / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(rd)
        run.say(format_summary(summary))
    return summary


CLASS_KEYS = ("val_class_names", "val_per_class", "val_confusion", "val_mistakes")


def _record_val(run: _Run, log: RunLog, record: Dict[str, Any]) -> None:
    """An evaluation into metrics.jsonl, and its confusion matrix redrawn into confusion.png (main process)."""
    log.write(record)
    if distributed.is_main():
        from .classplot import plot_confusion

        plot_confusion(run.run_dir, record)


def _count_skip(skips: Dict[str, int], result, step: int, lr: float, limit: int) -> None:
    """Count fp16 steps the loss scaler skipped; too many in a row (or a bad loss unscaled) stop the run."""
    if not result.skipped:
        if not np.isfinite(result.loss):
            raise FloatingPointError(f"loss is {result.loss} at step {step} (lr {lr:.3g}); "
                                     f"lower optim.lr or enable optim.clip_grad_norm")
        skips["in_a_row"] = 0
        return
    skips["total"] += 1
    skips["in_a_row"] += 1
    if limit and skips["in_a_row"] >= limit:
        raise FloatingPointError(
            f"{skips['in_a_row']} optimizer steps in a row skipped by the fp16 loss scaler (gradients inf/nan) "
            f"up to step {step} (train.max_skipped_steps {limit}); the loss is {result.loss}: lower optim.lr, "
            f"enable optim.clip_grad_norm, or use bf16 precision")
