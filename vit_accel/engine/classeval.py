"""Per-class validation results: accuracy per class, the confusion matrix, the most confident mistakes.

``ClassTally`` counts beside ``trainer.evaluate``'s sums, on the logits the backend already
returned (an argmax, a softmax and a bincount per batch: nothing per training step). Its
``reduce`` is collective, one all-reduce of every count and one gather of each process's
mistakes, called by every rank at the same point (blank lockstep batches add nothing).

The result (``val_*`` keys of the val record and of summary.json):

    val_class_names  the names (or "class N" for data without names)
    val_per_class    [{class, count, correct, accuracy}] (accuracy None for a class with no images)
    val_confusion    rows = true class, columns = predicted class; classes <= MATRIX_MAX_CLASSES only
    val_mistakes     the MISTAKES wrong predictions made with the highest confidence:
                     {key, class, predicted, confidence} (key: the sample's key in the shards)

Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import heapq
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..errors import InputError
from . import distributed

MATRIX_MAX_CLASSES = 100          # a 1000-class matrix is a million numbers per evaluation: per-class counts only
MISTAKES = 10


class LabelError(InputError, ValueError):
    """A label outside the model's head; the message names both numbers and where to change them."""


def check_labels(labels: torch.Tensor, num_classes: int, keys: Optional[Sequence[str]] = None,
                 where: str = "data.train_shards") -> None:
    """LabelError when a class index is outside 0..num_classes-1 (cross-entropy would fail without saying which)."""
    if labels.numel() == 0 or labels.is_floating_point():
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo >= 0 and hi < num_classes:
        return
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten().tolist()
    which = ", ".join("%s (label %d)" % (keys[i] if keys else "#%d" % i, int(labels[i])) for i in bad[:5])
    raise LabelError("label %d in %s is outside the model's head of %d classes (model.num_classes %d: labels 0..%d); "
                     "samples: %s. Set model.num_classes=auto with shards whose manifest lists the classes, or pin "
                     "the count the labels need" % (hi if hi >= num_classes else lo, where, num_classes, num_classes,
                                                    num_classes - 1, which))


class ClassTally:
    """Per-class counts, confusion and confident mistakes of one evaluation on this process."""

    def __init__(self, num_classes: int):
        self.c = num_classes
        self.matrix = num_classes <= MATRIX_MAX_CLASSES
        self.counts = torch.zeros(num_classes * num_classes if self.matrix else 2 * num_classes, dtype=torch.float64)
        self.mistakes = []  # type: List[Tuple[float, str, int, int]]  a min-heap of (confidence, key, label, pred)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, keys: Optional[Sequence[str]] = None) -> None:
        pred = logits.argmax(1)
        c = self.c
        if self.matrix:
            self.counts += torch.bincount(labels * c + pred, minlength=c * c).double()
        else:
            self.counts[:c] += torch.bincount(labels, minlength=c).double()
            self.counts[c:] += torch.bincount(labels[pred == labels], minlength=c).double()
        wrong = (pred != labels).nonzero().flatten()
        if keys is None or not len(wrong):
            return
        conf = logits[wrong].float().softmax(1).max(1).values
        for j in conf.topk(min(MISTAKES, len(wrong))).indices.tolist():  # only a batch's best can enter the heap
            i = int(wrong[j])
            item = (float(conf[j]), str(keys[i]), int(labels[i]), int(pred[i]))
            if len(self.mistakes) < MISTAKES:
                heapq.heappush(self.mistakes, item)
            elif item > self.mistakes[0]:
                heapq.heapreplace(self.mistakes, item)

    def reduce(self, names: Sequence[str]) -> Dict[str, Any]:
        """The ``val_*`` per-class keys over every process (collective)."""
        counts = distributed.all_reduce_sum(self.counts.clone())
        mistakes = list(self.mistakes)
        if distributed.is_distributed():
            mistakes = [m for rank in distributed.all_gather_object(mistakes) for m in rank]
        c = self.c
        names = list(names) if len(names) == c else ["class %d" % i for i in range(c)]
        if self.matrix:
            m = counts.view(c, c)
            total, correct = m.sum(1), m.diagonal()
        else:
            total, correct = counts[:c], counts[c:]
        out = {"val_class_names": names, "val_per_class": [
            {"class": names[i], "count": int(total[i]), "correct": int(correct[i]),
             "accuracy": float(correct[i] / total[i]) if total[i] else None} for i in range(c)]}
        if self.matrix:
            out["val_confusion"] = [[int(v) for v in row] for row in m.tolist()]
        out["val_mistakes"] = [{"key": key, "class": names[lab], "predicted": names[pred], "confidence": round(conf, 4)}
                               for conf, key, lab, pred in sorted(mistakes, reverse=True)[:MISTAKES]]
        return out


def top_k(record: Dict[str, Any]) -> Tuple[int, Optional[float]]:
    """(k, accuracy) of a record's ``val_topK`` (K = min(5, classes)); (5, None) when it has none."""
    for key, value in record.items():
        m = re.match(r"^val_top(\d+)$", key)
        if m and m.group(1) != "1":
            return int(m.group(1)), value
    return 5, None


def format_classes(record: Dict[str, Any], limit: int = 30) -> str:
    """Per-class accuracy (worst first) and the most confident mistakes, as text; "" without them."""
    per = record.get("val_per_class") or []
    if not per:
        return ""
    width = max([len(p["class"]) for p in per] + [5])
    lines = ["per class (worst first)", "  %-*s  %8s  %7s" % (width, "class", "accuracy", "images")]
    ranked = sorted(per, key=lambda p: (p["accuracy"] is None, p["accuracy"] if p["accuracy"] is not None else 0))
    for p in ranked[:limit]:
        acc = "-" if p["accuracy"] is None else "%.2f%%" % (100 * p["accuracy"])
        lines.append("  %-*s  %8s  %7d" % (width, p["class"], acc, p["count"]))
    if len(per) > limit:
        lines.append("  (+%d more classes in summary.json)" % (len(per) - limit))
    mistakes = record.get("val_mistakes") or []
    if mistakes:
        lines.append("most confident mistakes (key in the validation shards: true -> predicted, confidence)")
        for m in mistakes:
            lines.append("  %s: %s -> %s, %.1f%%" % (m["key"], m["class"], m["predicted"], 100 * m["confidence"]))
    return "\n".join(lines)
