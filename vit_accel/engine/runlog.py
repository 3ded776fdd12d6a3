"""What a run leaves behind: progress bar, metrics.jsonl, TensorBoard, schedule.json, summary.json, curves.png."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from .classeval import top_k
from .schedule import Schedule


class RunLog:
    """Writes the run directory's logs; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        if progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                file=sys.stderr, mininterval=1.0, desc="train")
            except ImportError:
                self.bar = None
        try:  # TensorBoard events when tensorboard is installed
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        except ImportError:
            self.tb = None
        except Exception as e:  # installed but broken: the run goes on, and says what is missing
            self.tb = None
            print(f"vit-accel: warning: TensorBoard is installed but failed ({type(e).__name__}: {e}); "
                  f"no TensorBoard events are written (metrics.jsonl has every value)", file=sys.stderr, flush=True)

    def advance(self, n: int, postfix: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = dict(record, time=round(time.time(), 3))
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    return out


def write_schedule(run_dir: Path, schedule: Schedule) -> None:
    """The resolved schedule (lengths in steps), from which every step's learning rate follows."""
    (Path(run_dir) / "schedule.json").write_text(json.dumps(asdict(schedule), indent=2))


def read_schedule(run_dir: Path) -> Optional[Schedule]:
    path = Path(run_dir) / "schedule.json"
    try:
        return Schedule(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):   # a run of an older version, or a damaged file
        return None


def lr_curve(run_dir: Path, train: List[Dict[str, Any]]):
    """(steps, rates): the schedule's rate of every optimizer step from 0 (schedule.json), or, for a
    run directory without one, the rates of the logged steps."""
    schedule = read_schedule(run_dir)
    if schedule is not None:
        return list(range(schedule.total_steps)), schedule.lrs()
    return [r["step"] for r in train], [r["lr"] for r in train]


def plot_curves(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Draw loss, validation accuracy and learning rate against step into curves.png.

    The learning rate is the schedule's at every step from 0 (schedule.json); a run directory
    without one draws the logged rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = _dedupe([r for r in records if r.get("kind") == "train"])
    val = _dedupe([r for r in records if r.get("kind") == "val"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2)
    axes[0].set_title("training loss")
    if val:
        axes[1].plot([r["step"] for r in val], [100 * r["val_top1"] for r in val], "o-", label="top-1")
        k = top_k(val[-1])[0]  # top-min(5, classes)
        axes[1].plot([r["step"] for r in val], [100 * (top_k(r)[1] or 0.0) for r in val], "s--", label=f"top-{k}")
        axes[1].legend()
    axes[1].set_title("validation accuracy (%)")
    axes[2].plot(*lr_curve(run_dir, train), lw=1.2)
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        fig.suptitle(f"{s.get('recipe', '')} on {s.get('backend', '')}: val top-1 "
                     f"{100 * s.get('val_top1', 0):.2f}%, {s.get('images_per_second', 0):.0f} images/s")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _dedupe(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Keep the last record per step (a resumed run re-logs steps after its checkpoint)."""
    by_step: Dict[int, Dict[str, Any]] = {}
    for r in records:
        by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def format_summary(s: Dict[str, Any]) -> str:
    lines = [f"run        {s.get('run_dir', '')}",
             f"recipe     {s.get('recipe')}  backend {s.get('backend')}  world size {s.get('world_size', 1)}",
             f"steps      {s.get('steps')}  global batch {s.get('global_batch_size')}",
             f"val top-1  {100 * s.get('val_top1', float('nan')):.2f}%   top-{top_k(s)[0]} "
             f"{100 * (top_k(s)[1] if top_k(s)[1] is not None else float('nan')):.2f}%",
             f"train loss {s.get('train_loss', float('nan')):.4f}",
             f"speed      {s.get('images_per_second', 0):.1f} images/s, wall {s.get('wall_seconds', 0):.1f} s"]
    if s.get("skipped_steps"):
        lines.append(f"fp16       {s['skipped_steps']} optimizer steps skipped by the loss scaler (inf/nan gradients)")
    for kind, what in (("bad_samples", "training"), ("val_bad_samples", "validation")):
        if s.get(kind):
            ex = (s.get(kind.replace("samples", "examples")) or [{}])[0]
            lines.append(f"skipped    {s[kind]} bad {what} samples, e.g. {ex.get('key')} in {ex.get('shard')}: "
                         f"{ex.get('reason')} (examples in summary.json)")
    return "\n".join(lines)
