"""confusion.png beside curves.png: the validation confusion matrix, rows named by class.

Rows are the true classes, labelled with their accuracy and image count; columns the predicted
classes; each cell is shaded by the share of its row (so a small class reads as clearly as a
large one) and shows its count while the matrix is small enough to read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .classeval import top_k

_COUNTS_UP_TO = 30      # classes up to which each cell prints its count


def plot_confusion(run_dir: Path, record: Dict[str, Any], out: Optional[Path] = None) -> Optional[Path]:
    """Draw ``record``'s ``val_confusion`` into RUN_DIR/confusion.png; None when it has no matrix."""
    matrix = record.get("val_confusion")
    if not matrix:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    names = record.get("val_class_names") or ["class %d" % i for i in range(n)]
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = min(3.0 + 0.45 * n, 30.0)
    fig, ax = plt.subplots(figsize=(side + 2.5, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    row_labels = ["%s  %s (%d)" % (name, "-" if not r else "%.0f%%" % (100 * m[i, i] / r), r)
                  for i, (name, r) in enumerate(zip(names, rows[:, 0].astype(int)))]
    ax.set_yticks(range(n), labels=row_labels, fontsize=8 if n > 20 else 10)
    ax.set_xticks(range(n), labels=names, rotation=90 if n > 6 else 0, fontsize=8 if n > 20 else 10)
    ax.set_ylabel("true class (accuracy, images)")
    ax.set_xlabel("predicted class")
    if n <= _COUNTS_UP_TO:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, "%d" % m[i, j], ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    k, topk = top_k(record)
    title = "validation at step %s: top-1 %.2f%%" % (record.get("step", "?"), 100 * record.get("val_top1", 0.0))
    if topk is not None:
        title += ", top-%d %.2f%%" % (k, 100 * topk)
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "confusion.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
