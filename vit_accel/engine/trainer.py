"""The trainer: one loop for every backend.

    recipe -> backend -> model (+ pretrained) -> loaders -> [resume] -> steps -> eval -> summary

Exact resume: a checkpoint holds model, optimizer, step, data position and RNG states, and
the dropout RNG is re-seeded from (seed, rank, step) every step, so a run killed at any point
and resumed from its last checkpoint ends with the same weights as one never interrupted.
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import Backend, create_backend
from ..config import ConfigError, Recipe, vit_options
from ..model import ViT, create_vit
from .ema import ModelEMA, check_ema_backend, ema_parameters
from .optim import check_optim_backend
from .runlog import RunLog, format_summary, plot_curves
from .schedule import build_schedule, needs_train_samples

CKPT_RE = re.compile(r"step_(\d+)\.pt$")


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

def build_model(recipe: Recipe, backend: Optional[Backend] = None, log=print) -> ViT:
    """The recipe's ViT with the backend's ops; loads ``model.pretrained`` when given."""
    opts = vit_options(recipe.model)
    if backend is not None:
        opts.update(backend.model_options())
    model = create_vit(recipe.model.name, **opts)
    if recipe.model.pretrained:
        from ..checkpoints import load_pretrained

        report = load_pretrained(model, recipe.model.pretrained, format=recipe.model.pretrained_format)
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


def evaluate(backend: Backend, recipe: Recipe, loader: Iterable) -> Dict[str, float]:
    """Top-1, top-5 and loss over the validation split (summed over every process)."""
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss_sum, count
    for images, labels in _in_lockstep(backend, loader, recipe.model.img_size):
        logits = backend.eval_step(images)
        if labels is None:  # a rank out of data keeps pace (ZeRO-3 gathers weights in every forward)
            continue
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels.view(-1, 1)
        sums += torch.tensor([hit[:, :1].sum().item(), hit.sum().item(),
                              F.cross_entropy(logits, labels, reduction="sum").item(), labels.numel()],
                             dtype=torch.float64)
    sums = backend.all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    out = {"val_top1": sums[0].item() / n, "val_top5": sums[1].item() / n, "val_loss": sums[2].item() / n,
           "val_count": int(sums[3].item())}
    bad = bad_samples(backend, getattr(loader, "stats", None))
    if bad["count"]:
        out.update(val_bad_samples=bad["count"], val_bad_examples=bad["examples"])
    return out


def _in_lockstep(backend: Backend, loader: Iterable, img_size: int):
    """The loader's batches, then (one blank image, None) until every rank is done.

    Ranks hold different numbers of validation batches when shards split unevenly; each forward
    under ZeRO-3 is collective, so every rank makes as many calls as the busiest one.
    """
    if backend.world_size <= 1 or not torch.distributed.is_initialized():
        yield from loader
        return
    it = iter(loader)
    while True:
        batch = next(it, None)
        busy = backend.all_reduce_sum(torch.tensor([0.0 if batch is None else 1.0], dtype=torch.float64))
        if busy[0].item() == 0:
            return
        yield batch if batch is not None else (torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8), None)


def bad_samples(backend: Backend, stats, since: int = 0) -> Dict[str, Any]:
    """Bad samples skipped on every rank: total count and (key, shard, reason) examples after ``since``.

    Collective when several processes run (every rank calls it at the same point).
    """
    count = int(stats.bad) if stats is not None else 0
    mine = [list(e) for e in stats.examples[since:]] if stats is not None else []
    if backend.world_size > 1 and torch.distributed.is_initialized():
        count = int(backend.all_reduce_sum(torch.tensor([count], dtype=torch.float64))[0].item())
        every = [None] * backend.world_size
        torch.distributed.all_gather_object(every, mine)
        mine = [e for rank in every for e in rank]
    return {"count": count, "examples": [{"key": k, "shard": sh, "reason": why} for k, sh, why in mine]}


def evaluate_with_ema(backend: Backend, recipe: Recipe, loader_fn, ema: Optional[ModelEMA]) -> Dict[str, float]:
    """``evaluate`` on the trained weights and, with an EMA, on the EMA weights (keys ``ema_*``)."""
    val = evaluate(backend, recipe, loader_fn())
    if ema is not None:
        with ema.swapped_in(ema_parameters(backend)):
            val.update({"ema_" + k: v for k, v in evaluate(backend, recipe, loader_fn()).items()})
    return val


# ---------------------------------------------------------------------------------------
# Run directory and checkpoints
# ---------------------------------------------------------------------------------------

def default_run_dir(recipe: Recipe, backend_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe.name}-{backend_name}-{stamp}"


def list_checkpoints(run_dir: Path):
    d = Path(run_dir) / "checkpoints"
    if not d.exists():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.search(p.name)) and not p.name.startswith(".")]
    return [p for _, p in sorted(found)]


def latest_run_dir(recipe: Recipe, backend_name: str) -> Optional[Path]:
    root = Path("runs")
    if not root.exists():
        return None
    cands = sorted(root.glob(f"{recipe.name}-{backend_name}-*"))
    cands = [c for c in cands if list_checkpoints(c)]
    return cands[-1] if cands else None


def _rng_state() -> Dict[str, Any]:
    """RNG states as tensors and plain types, so the checkpoint reads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": list(random.getstate())}


def _set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]  # a numpy array in files of older versions
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))


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


def _broadcast_run_dir(backend: Backend, run_dir: Path) -> Path:
    if backend.world_size > 1 and torch.distributed.is_initialized():
        box = [str(run_dir)]
        torch.distributed.broadcast_object_list(box, src=0)
        return Path(box[0])
    return run_dir


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

def train(recipe: Recipe, backend_name: str = "auto", run_dir: Optional[str] = None,
          resume: Optional[str] = None, progress: bool = True, stop_after: Optional[int] = None,
          trust_checkpoint: bool = False) -> Dict[str, Any]:
    """Train ``recipe`` on a backend; returns the summary (also written to summary.json).

    ``resume``: a checkpoint path, or "auto" for the latest in the run directory; it is read as
    tensors and plain types only unless ``trust_checkpoint`` (the full unpickler runs its code).
    ``stop_after``: end after this step (for tests and partial runs); checkpoints as usual.
    """
    backend = create_backend(backend_name, recipe)
    check_optim_backend(recipe.optim, backend.name)
    check_ema_backend(recipe, backend.name)
    main = backend.is_main
    say = (lambda s: print(s, flush=True)) if main else (lambda s: None)
    say(f"vit-accel: backend {backend.name} ({backend.world_size} process(es)), recipe {recipe.name}")

    # -- run directory and resume point ---------------------------------------------------
    ckpt_path: Optional[Path] = None
    if resume == "auto" and run_dir is None:
        found = latest_run_dir(recipe, backend.name)
        run_dir = str(found) if found else None
    rd = Path(run_dir) if run_dir else default_run_dir(recipe, backend.name)
    rd = _broadcast_run_dir(backend, rd)
    if resume == "auto":
        ckpts = list_checkpoints(rd)
        ckpt_path = ckpts[-1] if ckpts else None
        if ckpt_path is None:
            say(f"--resume auto: no checkpoint in {rd}; starting from step 0")
    elif resume:
        ckpt_path = Path(resume)
        if not ckpt_path.exists():
            raise ConfigError(f"--resume {resume}: no such checkpoint")

    # -- model, backend, data -------------------------------------------------------------
    seed = recipe.train.seed
    torch.manual_seed(seed)
    model = build_model(recipe, backend, log=say)
    backend.setup(model)
    ema = ModelEMA(recipe.train.ema_momentum, ema_parameters(backend)) if recipe.train.ema_momentum else None
    train_spec, val_spec = data_specs(recipe)
    from ..data import DataError, ResumeMismatch, build_eval_loader, build_train_loader, resolve_shards

    samples = resolve_shards(train_spec).num_samples if needs_train_samples(recipe.schedule) else None
    schedule = build_schedule(recipe.schedule, recipe.optim.lr, recipe.train.global_batch_size, samples)

    data_cfg = _with_shards(recipe, train_spec, val_spec)
    img = recipe.model.img_size
    train_loader = build_train_loader(data_cfg, img, backend.batch_per_call, seed=seed,
                                      rank=backend.rank, world_size=backend.world_size)

    def val_loader():
        return build_eval_loader(data_cfg, img, backend.eval_batch_size, rank=backend.rank,
                                 world_size=backend.world_size)

    step = 0
    skips = {"total": 0, "in_a_row": 0}      # fp16 steps the loss scaler skipped
    if ckpt_path is not None:
        state = backend.load_state(ckpt_path, trust=trust_checkpoint)
        step = int(state["step"])
        skips.update(state.get("skipped_steps") or {})
        try:
            train_loader.load_state_dict(state["data"])
        except ResumeMismatch as e:
            raise ConfigError(f"--resume {ckpt_path}: the data settings changed since the checkpoint "
                              f"({'; '.join(e.changes)}). Resume with the settings the run started with "
                              f"(they are in {rd / 'recipe.yaml'}): the order of samples depends on them") from None
        except DataError as e:
            raise ConfigError(f"--resume {ckpt_path}: {e}") from None
        if state.get("rng"):
            _set_rng_state(state["rng"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        elif ema is not None:
            say(f"{ckpt_path} has no EMA: the EMA restarts from the resumed weights")
        say(f"resumed from {ckpt_path} at step {step}")

    wrap = getattr(backend, "wrap_train_loader", None)
    if wrap:  # a feed that reads ahead: checkpoints take its position (of the batches it handed out)
        train_loader, wrap = wrap(train_loader), None
    batches = iter(wrap(train_loader) if wrap else train_loader)
    total = schedule.total_steps
    end = min(total, stop_after) if stop_after else total
    done = _completed_summary(rd, step, total)
    if done is not None:
        say(f"run already complete: step {step} of schedule.total_steps {total}; nothing to train. "
            f"Its summary ({rd / 'summary.json'}):")
        say(format_summary(done))
        backend.close()
        return done
    say(f"run directory {rd}; {backend.batch_per_call} images per call x {backend.world_size} process(es); "
        f"global batch {recipe.train.global_batch_size}; steps {step} -> {end}; schedule {schedule.describe()}")
    log = RunLog(rd, total, step, enabled=main, progress=progress)
    if main:
        (rd / "recipe.yaml").write_text(recipe.to_yaml())

    # -- steps ----------------------------------------------------------------------------
    t_start = time.time()
    train_time, images_done, window_loss, window_n = 0.0, 0, 0.0, 0
    last_loss = float("nan")
    bad_logged = len(getattr(getattr(train_loader, "stats", None), "examples", []))
    val: Dict[str, float] = {}
    spc = backend.steps_per_call
    mix = None
    if recipe.data.mixup > 0 or recipe.data.cutmix > 0:
        from ..data import BatchMix

        d = recipe.data
        mix = BatchMix(recipe.model.num_classes, d.mixup, d.cutmix, d.mix_prob, d.mix_switch_prob,
                       recipe.optim.label_smoothing, batch_size=backend.batch_per_call)
    while step < end:
        images, labels = next(batches)
        # Seeded after the fetch: starting DataLoader workers draws from torch's RNG, and that
        # happens at a different step in a resumed run.
        torch.manual_seed(_step_seed(seed, backend.rank, step))
        lr = schedule.lr(step)
        if mix is not None:  # on the host, before normalization (affine, so the same as after), for every backend
            images, labels = mix(images, labels, _step_seed(seed, backend.rank, step))
        t0 = time.perf_counter()
        result = backend.train_step(images, labels, lr)
        dt = time.perf_counter() - t0
        _count_skip(skips, result, step, lr, recipe.train.max_skipped_steps)
        if ema is not None:
            ema.update(ema_parameters(backend))
        step += spc
        train_time += dt
        images_done += images.shape[0] * backend.world_size
        if np.isfinite(result.loss):  # a skipped fp16 step may carry an inf/nan loss
            window_loss += result.loss
            window_n += 1
        ips = images.shape[0] * backend.world_size / max(dt, 1e-9)
        post = {"loss": f"{result.loss:.4f}", "lr": f"{lr:.3g}", "img/s": f"{ips:.0f}"}
        if skips["total"]:
            post["skipped"] = str(skips["total"])
        log.advance(spc, post)
        if step % recipe.train.log_every < spc or step >= end:
            last_loss = window_loss / window_n if window_n else float("nan")
            rec = {"kind": "train", "step": step, "loss": last_loss, "lr": lr,
                   "images_per_second": images_done / max(train_time, 1e-9), "skipped_steps": skips["total"]}
            if result.grad_norm is not None:
                rec["grad_norm"] = result.grad_norm
            bad = bad_samples(backend, getattr(train_loader, "stats", None), since=bad_logged)
            bad_logged = len(getattr(getattr(train_loader, "stats", None), "examples", []))
            if bad["count"]:
                rec.update(bad_samples=bad["count"], bad_examples=bad["examples"])
            log.write(rec)
            window_loss, window_n = 0.0, 0
        if recipe.train.eval_every and step % recipe.train.eval_every < spc and step < end:
            val = evaluate_with_ema(backend, recipe, val_loader, ema)
            log.write(dict(kind="val", step=step, **val))
            log.message(f"step {step}: val top-1 {100 * val['val_top1']:.2f}%  top-5 {100 * val['val_top5']:.2f}%")
        if recipe.train.checkpoint_every and step % recipe.train.checkpoint_every < spc and step < end:
            save_checkpoint(backend, recipe, rd, step, train_loader, ema=ema, skips=skips)

    # -- end: final checkpoint, evaluation, summary ------------------------------------------
    save_checkpoint(backend, recipe, rd, step, train_loader, ema=ema, skips=skips)
    val = evaluate_with_ema(backend, recipe, val_loader, ema)
    log.write(dict(kind="val", step=step, **val))
    log.close()
    bad = bad_samples(backend, getattr(train_loader, "stats", None))
    if images_done == 0:  # resumed at the end of the schedule, before summary.json was written
        last_loss, ips = _last_logged(rd)
    else:
        ips = images_done / max(train_time, 1e-9)
    summary = {
        "recipe": recipe.name, "backend": backend.name, "world_size": backend.world_size,
        "run_dir": str(rd), "steps": step, "global_batch_size": recipe.train.global_batch_size,
        "val_top1": val["val_top1"], "val_top5": val["val_top5"], "val_loss": val["val_loss"],
        "train_loss": last_loss, "images_per_second": ips,
        "wall_seconds": time.time() - t_start, "versions": versions(),
        "bad_samples": bad["count"], "bad_examples": bad["examples"],
        "val_bad_samples": val.get("val_bad_samples", 0), "val_bad_examples": val.get("val_bad_examples", []),
        "skipped_steps": skips["total"],
    }
    summary.update({k: v for k, v in val.items() if k.startswith("ema_")})
    if main:
        (rd / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(rd)
        say(format_summary(summary))
    backend.close()
    return summary


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


def _completed_summary(rd: Path, step: int, total: int) -> Optional[Dict[str, Any]]:
    """summary.json of a run resumed at the end of its schedule (None while steps remain)."""
    path = Path(rd) / "summary.json"
    if step < total or not path.exists():
        return None
    s = json.loads(path.read_text())
    return s if s.get("steps") == step else None


def _last_logged(rd: Path) -> Tuple[float, float]:
    """(training loss, images/s) of the last train record in metrics.jsonl."""
    from .runlog import read_metrics

    last = ([r for r in read_metrics(rd) if r.get("kind") == "train"] or [{}])[-1]
    return float(last.get("loss", float("nan"))), float(last.get("images_per_second", 0.0))


def save_checkpoint(backend: Backend, recipe: Recipe, run_dir: Path, step: int, loader,
                    ema: Optional[ModelEMA] = None, skips: Optional[Dict[str, int]] = None) -> Path:
    """Write checkpoints/step_N.pt atomically and keep the newest ``train.keep_checkpoints``."""
    from ..model import ViTConfig  # noqa: F401  (documented: vit_config is ViTConfig.to_dict())

    path = Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"
    data_state = loader.state_dict()
    if backend.world_size > 1 and torch.distributed.is_initialized():
        # every rank's own position (bad samples skipped differ per rank); each picks its own on resume
        per_rank = [None] * backend.world_size
        torch.distributed.all_gather_object(per_rank, data_state)
        data_state = {"per_rank": per_rank}
    extra = {"step": step, "data": data_state, "rng": _rng_state(), "recipe": recipe.to_dict(),
             "vit_config": create_vit_config_dict(recipe, backend), "skipped_steps": dict(skips or {})}
    if ema is not None:
        extra["ema"] = ema.state_dict()
    backend.save_state(path, extra)
    if backend.is_main and recipe.train.keep_checkpoints > 0:
        for old in list_checkpoints(run_dir)[:-recipe.train.keep_checkpoints]:
            _remove(old)
    return path


def create_vit_config_dict(recipe: Recipe, backend: Optional[Backend]) -> Dict[str, Any]:
    """The ViTConfig of the trained model with portable (torch) ops, for eval/convert anywhere."""
    from ..model import vit_config

    cfg = vit_config(recipe.model.name, **vit_options(recipe.model)).to_dict()
    cfg.update(attn_impl="sdpa", norm_impl="torch", mlp_impl="torch")
    return cfg


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    side = path.with_suffix(".ds")  # DeepSpeed's directory beside the file, when present
    if side.exists():
        shutil.rmtree(side, ignore_errors=True)
