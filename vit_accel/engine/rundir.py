"""The run directory: where a run writes, the checkpoints in it and what they hold besides the
backend's state (step, data position, RNG states, recipe, EMA, skipped fp16 steps), and what a
resumed or restarted run finds there.

A checkpoint counts once its completion marker is written (engine/saving.py); ``--resume auto``
takes the newest complete one. A run directory written before markers existed has none: there
the newest ``step_N.pt`` counts (it was written atomically, last). Python 3.8 / torch 2.0
compatible: the IPU path imports this module.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..config import ConfigError, Recipe, vit_options
from . import distributed
from .ema import ModelEMA
from .saving import current_writer, marker_path, read_marker, write_marker

if TYPE_CHECKING:  # the trainer hands its backend in; the engine's helpers never build one
    from ..backends import Backend

CKPT_RE = re.compile(r"step_(\d+)\.pt$")
# what a checkpoint's weights and schedule depend on: a resume that changes one is refused
SHAPE_KEYS = ("model.name", "model.img_size", "model.patch_size", "model.depth", "model.num_classes",
              "model.representation_size", "model.global_pool", "model.fc_norm", "train.global_batch_size")
RESTART_VARS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


def default_run_dir(recipe: Recipe, backend_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe.name}-{backend_name}-{stamp}"


def list_checkpoints(run_dir: Path, complete: bool = True):
    """``checkpoints/step_N.pt`` files by step: only complete ones (marker checked) unless ``complete=False``."""
    d = Path(run_dir) / "checkpoints"
    if not d.exists():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.search(p.name)) and not p.name.startswith(".")]
    found = [p for _, p in sorted(found)]
    if not complete:
        return found
    if not any(d.glob("step_*.done")):   # written before markers existed: each .pt was written last
        return found
    return [p for p in found if read_marker(p) is not None]


def latest_run_dir(recipe: Recipe, backend_name: str) -> Optional[Path]:
    root = Path("runs")
    if not root.exists():
        return None
    cands = sorted(root.glob(f"{recipe.name}-{backend_name}-*"))
    cands = [c for c in cands if list_checkpoints(c)]
    return cands[-1] if cands else None


def rng_state() -> Dict[str, Any]:
    """RNG states as tensors and plain types, so the checkpoint reads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": list(random.getstate())}


def set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]  # a numpy array in files of older versions
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))


def restart_count() -> Tuple[int, str]:
    """(how many times the scheduler or launcher restarted this job, the variable that says so)."""
    for var in RESTART_VARS:
        n = int(os.environ.get(var, "0") or 0)
        if n > 0:
            return n, var
    return 0, ""


def run_dir_and_checkpoint(recipe: Recipe, backend_name: str, run_dir: Optional[str], resume: Optional[str],
                           say) -> Tuple[Path, Optional[Path]]:
    """The run directory (the same on every rank) and the checkpoint to resume from, if any.

    Decided by rank 0 alone (another rank may look after rank 0 has started writing there) and
    broadcast; errors are raised on every rank.
    """
    decision = None  # type: Any
    if distributed.is_main():
        try:
            decision = ("ok",) + _decide(recipe, backend_name, run_dir, resume, say)
        except ConfigError as e:
            decision = ("error", str(e))
    decision = distributed.broadcast_object(decision)
    if decision[0] == "error":
        raise ConfigError(decision[1])
    _, path, ckpt = decision
    return Path(path), Path(ckpt) if ckpt else None


def _decide(recipe: Recipe, backend_name: str, run_dir: Optional[str], resume: Optional[str], say):
    restarts, var = restart_count()
    if resume == "auto" and run_dir is None:
        found = latest_run_dir(recipe, backend_name)
        run_dir = str(found) if found else None
    rd = Path(run_dir) if run_dir else default_run_dir(recipe, backend_name)
    if resume == "auto" and restarts and not rd.is_dir():
        raise ConfigError(f"--resume auto: this is restart {restarts} of the job ({var}={restarts}), but its run "
                          f"directory {rd} does not exist: it was removed, or it is not on a filesystem this node "
                          f"sees. Nothing to continue; start the run afresh without --resume (or point --run-dir at "
                          f"where it is)")
    if not resume:
        held = existing_run(rd)
        if held:
            raise ConfigError(f"--run-dir {rd} already holds a run ({held}); continue it with --resume auto, or "
                              f"start a new one in another --run-dir (starting over here would mix the two runs' "
                              f"metrics and checkpoints)")
        rd.mkdir(parents=True, exist_ok=True)   # a restarted launch finds it
        return str(rd), None
    if resume != "auto":
        if not Path(resume).exists():
            raise ConfigError(f"--resume {resume}: no such checkpoint")
        rd.mkdir(parents=True, exist_ok=True)
        return str(rd), str(resume)
    rd.mkdir(parents=True, exist_ok=True)
    _remove_incomplete(rd)
    ckpts = list_checkpoints(rd)
    if ckpts:
        return str(rd), str(ckpts[-1])
    aside = _set_metrics_aside(rd)
    say(f"--resume auto: no complete checkpoint in {rd}; starting from step 0"
        + (f" (the earlier attempt's metrics moved to {aside})" if aside else ""))
    return str(rd), None


def _set_metrics_aside(rd: Path) -> Optional[str]:
    """Move metrics.jsonl (and tb/) of an attempt that left no checkpoint out of the new run's way."""
    metrics = rd / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    n = 1
    while (rd / f"metrics.jsonl.{n}").exists():
        n += 1
    os.replace(metrics, rd / f"metrics.jsonl.{n}")
    if (rd / "tb").is_dir():
        os.replace(rd / "tb", rd / f"tb.{n}")
    return f"metrics.jsonl.{n}"


def _remove_incomplete(rd: Path) -> None:
    """Files of saves that never completed (a kill mid-save): partial checkpoints newer than the
    newest complete one, and temporary files."""
    d = rd / "checkpoints"
    if not d.is_dir():
        return
    complete = list_checkpoints(rd)
    newest = int(CKPT_RE.search(complete[-1].name).group(1)) if complete else -1
    for p in list_checkpoints(rd, complete=False):
        if p not in complete and int(CKPT_RE.search(p.name).group(1)) > newest:
            _remove(p)
    for tmp in d.glob(".*.tmp*"):
        tmp.unlink()
    for side in d.glob("step_*.ds"):
        if not side.with_suffix(".pt").exists():
            _remove(side.with_suffix(".pt"))


def existing_run(rd: Path) -> Optional[str]:
    """What of an earlier run ``rd`` holds (checkpoints, metrics), or None."""
    held = []
    ckpts = list_checkpoints(rd, complete=False)
    if ckpts:
        held.append(f"checkpoints up to {ckpts[-1].name}")
    metrics = rd / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        held.append("metrics.jsonl")
    return " and ".join(held) or None


def recipe_values(recipe: Dict[str, Any]) -> Dict[str, Any]:
    """The SHAPE_KEYS of a recipe dict (``Recipe.to_dict()``)."""
    out = {}
    for key in SHAPE_KEYS:
        section, name = key.split(".")
        out[key] = (recipe.get(section) or {}).get(name)
    return out


def check_resumable(recipe: Recipe, saved: Dict[str, Any], ckpt: Path, rd: Path) -> None:
    """ConfigError naming every key of SHAPE_KEYS that differs from the checkpoint's recipe."""
    now, then = recipe_values(recipe.to_dict()), recipe_values(saved)
    diff = [f"{k} {then[k]!r} -> {now[k]!r}" for k in SHAPE_KEYS if then[k] is not None and then[k] != now[k]]
    if diff:
        raise ConfigError(f"--resume {ckpt}: the recipe changed what the checkpoint was trained with: "
                          f"{'; '.join(diff)}. Resume with the values the run started with (they are in "
                          f"{rd / 'recipe.yaml'}), or start a new run from its weights with "
                          f"--set model.pretrained={ckpt}")


def redone_steps(rd: Path, step: int) -> Tuple[int, int]:
    """(steps the interrupted attempt had logged beyond ``step``, the last step it logged)."""
    from .runlog import read_metrics

    logged = [int(r["step"]) for r in read_metrics(rd) if r.get("kind") in ("train", "val") and "step" in r]
    last = max(logged) if logged else step
    return max(0, last - step), last


def completed_summary(rd: Path, step: int, total: int) -> Optional[Dict[str, Any]]:
    """summary.json of a run resumed at the end of its schedule (None while steps remain)."""
    path = Path(rd) / "summary.json"
    if step < total or not path.exists():
        return None
    s = json.loads(path.read_text())
    return s if s.get("steps") == step else None


def last_logged(rd: Path) -> Tuple[float, float]:
    """(training loss, images/s) of the last train record in metrics.jsonl."""
    from .runlog import read_metrics

    last = ([r for r in read_metrics(rd) if r.get("kind") == "train"] or [{}])[-1]
    return float(last.get("loss", float("nan"))), float(last.get("images_per_second", 0.0))


def save_checkpoint(backend: Backend, recipe: Recipe, run_dir: Path, step: int, loader,
                    ema: Optional[ModelEMA] = None, skips: Optional[Dict[str, int]] = None,
                    class_names=()) -> Path:
    """Write checkpoints/step_N.pt (every rank's part), then its completion marker, then keep the
    newest ``train.keep_checkpoints``. Collective. Asynchronous writes (``train.async_checkpoint``)
    finish the marker and the pruning in the background. ``class_names`` travel in its
    ``vit_config`` (what predict prints, convert writes)."""
    path = Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"
    data_state = loader.state_dict()
    if distributed.is_distributed():
        # every rank's own position (its streams); a resume on any layout picks each stream's from its reader
        data_state = {"per_rank": distributed.all_gather_object(data_state)}
    extra = {"step": step, "data": data_state, "rng": rng_state(), "recipe": recipe.to_dict(),
             "vit_config": create_vit_config_dict(recipe, class_names), "skipped_steps": dict(skips or {})}
    if ema is not None:
        extra["ema"] = ema.state_dict()
    if distributed.is_main() and marker_path(path).exists():
        os.remove(marker_path(path))        # this step is being written again: not complete until done
    backend.save_state(path, extra)         # ends with a barrier: every rank's part is on disk
    if distributed.is_main():
        strategy = getattr(backend, "strategy", None)
        info = {"step": step, "world_size": distributed.world_size(), "backend": backend.name,
                "zero_stage": getattr(strategy, "zero_stage", -1) if strategy is not None else -1,
                "recipe": recipe_values(recipe.to_dict())}
        keep = recipe.train.keep_checkpoints

        def complete() -> None:
            write_marker(path, info)
            if keep > 0:
                for old in list_checkpoints(run_dir)[:-keep]:
                    _remove(old)

        current_writer().then(complete)
    return path


def create_vit_config_dict(recipe: Recipe, class_names=()) -> Dict[str, Any]:
    """The ViTConfig of the trained model (``ViTConfig.to_dict``) with portable (torch) ops, for
    eval/convert anywhere."""
    from ..model import vit_config

    return vit_config(recipe.model.name, class_names=tuple(class_names), **vit_options(recipe.model)).portable_dict()


def _remove(path: Path) -> None:
    """A checkpoint: its marker first (it stops counting at once), then its files."""
    import shutil

    for part in (path.with_suffix(".done"), path, path.with_suffix(".ds")):  # .ds: DeepSpeed's, when present
        if part.is_dir():
            shutil.rmtree(part, ignore_errors=True)
        else:
            try:
                os.remove(part)
            except FileNotFoundError:
                pass
