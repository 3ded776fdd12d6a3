"""A folder of your own photos as training and validation shards (``make-shards --source imagefolder``).

Two layouts:

* ``ROOT/train/<class>/...`` and ``ROOT/val/<class>/...`` (``valid``/``validation`` too, timm's
  names): the sub-folders are the split; classes are the training folders' names, sorted.
* ``ROOT/<class>/...``: a seeded, per-class (stratified) ``val_fraction`` of each class is held out,
  so every class keeps its share in both parts. The draw depends only on the seed and the file
  names, so re-running keeps the same split and the finished shards.

Sample keys are the path below the split folder without its extension (``cat/IMG_0001.jpg`` ->
``cat_IMG_0001``), so a key in a report leads back to its file.

Nothing is dropped silently: files that are not images by extension are listed, an empty class
folder, images outside any class folder, a class found only in ``val/``, a single class, or
other folders beside ``train/`` and ``val/`` stop with a message saying what to move where.
Python 3.8 compatible.
"""
from __future__ import annotations

import os
import random
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from .shards import IMAGE_EXTENSIONS, ShardError, SourceSample, _is_image, _unique_keys

TRAIN_DIRS = ("train",)
VAL_DIRS = ("val", "valid", "validation")  # timm's eval-split synonyms
_SHOWN = 8


class Split(NamedTuple):
    """What make-shards writes: the samples of each part, the classes, and how it was decided."""
    train: List[SourceSample]
    val: List[SourceSample]
    classes: List[str]
    layout: str                  # "folders" (train/ and val/ given) or "held out" (a fraction split off)
    notes: List[str]


def _listing(paths: List[str], limit: int = _SHOWN) -> str:
    return ", ".join(paths[:limit]) + (" (+%d more)" % (len(paths) - limit) if len(paths) > limit else "")


def _subdirs(path: str) -> List[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _class_files(base: str) -> Tuple[Dict[str, List[str]], List[str]]:
    """{class: image paths (sorted)} of BASE/<class>/**, and the files that are not images by extension."""
    loose = sorted(n for n in os.listdir(base) if os.path.isfile(os.path.join(base, n)) and not n.startswith("."))
    images = [n for n in loose if _is_image(n)]
    if images:
        raise ShardError("%s holds %d images outside any class folder (%s): move them into %s/<class>/ (one folder "
                         "per class; the folder's name is the class)" % (base, len(images), _listing(images), base))
    found, ignored = {}, []  # type: Dict[str, List[str]], List[str]
    for c in _subdirs(base):
        files = []
        for dirpath, dirnames, names in os.walk(os.path.join(base, c)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for n in sorted(names):
                if n.startswith("."):
                    continue
                (files if _is_image(n) else ignored).append(os.path.join(dirpath, n))
        found[c] = files
    return found, [os.path.relpath(p, base) for p in ignored]


def _samples(files: List[Tuple[str, int]], base: str) -> List[SourceSample]:
    rels = [os.path.relpath(p, base) for p, _ in files]
    keys = _unique_keys([os.path.splitext(r)[0] for r in rels])
    return [SourceSample(k, label, rel, path=p) for k, (p, label), rel in zip(keys, files, rels)]


def _layout(root: str) -> Tuple[str, Optional[str]]:
    """(training folder, validation folder or None) of ROOT; refuses folders that would be left out."""
    subdirs = _subdirs(root)
    train = next((d for d in TRAIN_DIRS if d in subdirs), None)
    if train is None:
        return root, None
    vals = [d for d in VAL_DIRS if d in subdirs]
    if len(vals) > 1:
        raise ShardError("%s has %s: keep one validation folder" % (root, " and ".join(v + "/" for v in vals)))
    others = [d for d in subdirs if d != train and d not in vals]
    if others:
        raise ShardError("%s holds %s/ and also %s: with a %s/ folder every class goes under %s/<class>/ (and "
                         "%s/<class>/ for validation); move %s there, or rename %s/ if it is a class"
                         % (root, train, ", ".join(d + "/" for d in others), train, train, (vals or ["val"])[0],
                            _listing(others), train))
    return os.path.join(root, train), os.path.join(root, vals[0]) if vals else None


def _check_classes(base: str, found: Dict[str, List[str]], ignored: List[str]) -> None:
    if not found:
        raise ShardError("%s has no class folders (ImageFolder needs %s/<class>/<image>, one folder per class)"
                         % (base, base))
    empty = [c for c, files in found.items() if not files]
    if empty:
        why = (" (%d files there are not images by extension %s: %s)" % (len(ignored), "/".join(IMAGE_EXTENSIONS),
                                                                        _listing(ignored)) if ignored else "")
        raise ShardError("class folder%s %s under %s hold%s no images%s: add images (a class with no training images "
                         "cannot be learned) or remove the folder%s"
                         % ("s" if len(empty) > 1 else "", _listing(empty), base, "" if len(empty) > 1 else "s", why,
                            "s" if len(empty) > 1 else ""))
    if len(found) < 2:
        raise ShardError("%s has one class folder (%s): a classifier needs at least two classes, one folder each "
                         "(%s/<class>/<image>)" % (base, next(iter(found)), base))


def split_imagefolder(root: str, val_fraction: float = 0.1, seed: int = 0) -> Split:
    """The training and validation samples of a photo folder (either layout, see the module doc)."""
    if not os.path.isdir(root):
        raise ShardError("--input %s is not a directory (ImageFolder needs ROOT/<class>/<image>)" % root)
    if not 0.0 <= val_fraction < 1.0:
        raise ShardError("--val-fraction %g must be in [0, 1)" % val_fraction)
    train_dir, val_dir = _layout(root)
    found, ignored = _class_files(train_dir)
    _check_classes(train_dir, found, ignored)
    classes = sorted(found)
    index = {c: i for i, c in enumerate(classes)}
    notes = []
    if ignored:
        notes.append("ignored %d files that are not images by extension (%s): %s"
                     % (len(ignored), "/".join(IMAGE_EXTENSIONS), _listing(ignored)))
    if val_dir is not None:
        val_found, val_ignored = _class_files(val_dir)
        only_val = [c for c in val_found if c not in index]
        if only_val:
            raise ShardError("class%s %s %s only in %s, not in %s: add %s training images under %s/<class>/, or move "
                             "the folder%s out of %s"
                             % ("es" if len(only_val) > 1 else "", _listing(only_val), "are" if len(only_val) > 1 else
                                "is", val_dir, train_dir, "their" if len(only_val) > 1 else "its", train_dir,
                                "s" if len(only_val) > 1 else "", val_dir))
        if val_ignored:
            notes.append("ignored %d files in %s that are not images by extension: %s"
                         % (len(val_ignored), val_dir, _listing(val_ignored)))
        unseen = [c for c in classes if not val_found.get(c)]
        if unseen:
            notes.append("no validation images for %s (their accuracy will not be measured)" % _listing(unseen))
        train = _samples([(p, index[c]) for c in classes for p in found[c]], train_dir)
        val = _samples([(p, index[c]) for c in classes for p in val_found.get(c, [])], val_dir)
        return Split(train, val, classes, "folders", notes)
    everything = _samples([(p, index[c]) for c in classes for p in found[c]], train_dir)
    by_class = {}  # type: Dict[int, List[SourceSample]]
    for s in everything:
        by_class.setdefault(s.label, []).append(s)
    train, val, single = [], [], []  # type: List[SourceSample], List[SourceSample], List[str]
    for label, items in sorted(by_class.items()):
        order = list(items)
        random.Random("%d/%s" % (seed, classes[label])).shuffle(order)  # str seeds hash the same everywhere
        n_val = int(round(len(order) * val_fraction))
        if val_fraction > 0:
            n_val = min(max(n_val, 1), len(order) - 1)
        if val_fraction > 0 and n_val == 0:
            single.append(classes[label])
        val.extend(sorted(order[:n_val], key=lambda s: s.source))
        train.extend(sorted(order[n_val:], key=lambda s: s.source))
    if single:
        notes.append("one image only, kept for training (none held out): %s" % _listing(single))
    return Split(train, val, classes, "held out", notes)


def split_table(split: Split, written: Optional[Dict[str, Dict[int, int]]] = None) -> List[str]:
    """One line per class: training and validation images (``written``: per part, after skips)."""
    def counts(samples: List[SourceSample]) -> Dict[int, int]:
        out = {}  # type: Dict[int, int]
        for s in samples:
            out[s.label] = out.get(s.label, 0) + 1
        return out

    written = written or {}
    tr = written["train"] if "train" in written else counts(split.train)
    va = written["val"] if "val" in written else counts(split.val)
    width = max([len(c) for c in split.classes] + [5])
    lines = ["%-*s  %7s  %5s" % (width, "class", "train", "val")]
    for i, c in enumerate(split.classes):
        lines.append("%-*s  %7d  %5d" % (width, c, tr.get(i, 0), va.get(i, 0)))
    lines.append("%-*s  %7d  %5d" % (width, "total", sum(tr.values()), sum(va.values())))
    return lines


def written_counts(samples: List[SourceSample], manifest: Dict[str, object]) -> Dict[int, int]:
    """Per-class samples that reached the shards: planned minus those skipped as unreadable."""
    skipped = set(s["source"] for s in manifest.get("skipped", []))  # type: ignore[union-attr]
    out = {}  # type: Dict[int, int]
    for s in samples:
        if s.source not in skipped:
            out[s.label] = out.get(s.label, 0) + 1
    return out


def write_split(split: Split, out_dir: str, train_name: str, val_name: str, write: Callable[..., Dict],
                log: Callable[[str], None]) -> None:
    """Write both parts with ``write(samples, name)``; print the per-class table and every skipped file."""
    log("%s: %d classes, %s" % (out_dir, len(split.classes), "the train/ and val/ folders" if split.layout == "folders"
                                else "validation held out per class"))
    for n in split.notes:
        log("note: " + n)
    written, skipped = {}, []  # type: Dict[str, Dict[int, int]], List[Tuple[str, str]]
    for part, samples, name in (("train", split.train, train_name), ("val", split.val, val_name)):
        if not samples:
            continue
        manifest = write(samples, name)
        written[part] = written_counts(samples, manifest)
        skipped.extend((s["source"], s["reason"]) for s in manifest.get("skipped", []))
    for line in split_table(split, written):
        log("  " + line)
    if skipped:
        log("skipped %d files that could not be read as images (recorded under \"skipped\" in the manifests):"
            % len(skipped))
        for source, reason in skipped:
            log("  %s: %s" % (source, reason))
    lost = [c for i, c in enumerate(split.classes) if not written.get("train", {}).get(i)]
    if lost:
        raise ShardError("class%s %s %s no readable training image (see the skipped files above): replace or remove "
                         "them and run the same command again (finished shards are kept)"
                         % ("es" if len(lost) > 1 else "", _listing(lost), "have" if len(lost) > 1 else "has"))
