"""The run directory: where a run writes, the checkpoints in it and what they hold besides the
backend's state (step, data position, RNG states, recipe, EMA, skipped fp16 steps).

Python 3.8 / torch 2.0 compatible: the IPU path imports this module.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..backends import Backend
from ..config import ConfigError, Recipe, vit_options
from . import distributed
from .ema import ModelEMA

CKPT_RE = re.compile(r"step_(\d+)\.pt$")


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


def run_dir_and_checkpoint(recipe: Recipe, backend_name: str, run_dir: Optional[str], resume: Optional[str],
                            say) -> Tuple[Path, Optional[Path]]:
    """The run directory (the same on every rank) and the checkpoint to resume from, if any."""
    if resume == "auto" and run_dir is None:
        found = latest_run_dir(recipe, backend_name)
        run_dir = str(found) if found else None
    path = str(Path(run_dir) if run_dir else default_run_dir(recipe, backend_name))
    # decided by rank 0 alone: another rank may look after rank 0 has started writing there
    path, held = distributed.broadcast_object((path, None if resume else existing_run(Path(path))))
    rd = Path(path)
    if held:
        raise ConfigError(f"--run-dir {rd} already holds a run ({held}); continue it with --resume auto, or start "
                          f"a new one in another --run-dir (starting over here would mix the two runs' metrics "
                          f"and checkpoints)")
    if resume == "auto":
        ckpts = list_checkpoints(rd)
        if not ckpts:
            say(f"--resume auto: no checkpoint in {rd}; starting from step 0")
        return rd, ckpts[-1] if ckpts else None
    if resume and not Path(resume).exists():
        raise ConfigError(f"--resume {resume}: no such checkpoint")
    return rd, Path(resume) if resume else None


def existing_run(rd: Path) -> Optional[str]:
    """What of an earlier run ``rd`` holds (checkpoints, metrics), or None."""
    held = []
    ckpts = list_checkpoints(rd)
    if ckpts:
        held.append(f"checkpoints up to {ckpts[-1].name}")
    metrics = rd / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        held.append("metrics.jsonl")
    return " and ".join(held) or None


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
    """Write checkpoints/step_N.pt atomically and keep the newest ``train.keep_checkpoints``.

    ``class_names`` travel in its ``vit_config`` (what predict prints, convert writes)."""
    from ..model import ViTConfig  # noqa: F401  (documented: vit_config is ViTConfig.to_dict())

    path = Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"
    data_state = loader.state_dict()
    if distributed.is_distributed():
        # every rank's own position (bad samples skipped differ per rank); each picks its own on resume
        data_state = {"per_rank": distributed.all_gather_object(data_state)}
    extra = {"step": step, "data": data_state, "rng": rng_state(), "recipe": recipe.to_dict(),
             "vit_config": create_vit_config_dict(recipe, backend, class_names), "skipped_steps": dict(skips or {})}
    if ema is not None:
        extra["ema"] = ema.state_dict()
    backend.save_state(path, extra)
    if distributed.is_main() and recipe.train.keep_checkpoints > 0:
        for old in list_checkpoints(run_dir)[:-recipe.train.keep_checkpoints]:
            _remove(old)
    return path


def create_vit_config_dict(recipe: Recipe, backend: Optional[Backend], class_names=()) -> Dict[str, Any]:
    """The ViTConfig of the trained model with portable (torch) ops, for eval/convert anywhere."""
    from ..model import vit_config

    cfg = vit_config(recipe.model.name, class_names=tuple(class_names), **vit_options(recipe.model)).to_dict()
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
