"""Writing webdataset shards and their manifest (the `make-shards` command is make_shards.py).

A shard is a plain tar holding, per sample, `KEY.jpg` (or `KEY.png`), `KEY.cls` (the class
index as ASCII digits) and `KEY.json` (`{"label", "class", "source"}`): the layout the
`webdataset` library reads unchanged. Beside the shards, `NAME.json` (the manifest) records
the shard names, samples and bytes per shard, their sha256, the classes, the samples skipped
as unreadable, and a hash of the plan (sources, order, options).

Why a manifest: the loader knows each epoch's length and can balance ranks without opening
a shard, and a re-run of make-shards skips every shard whose file still matches its
recorded sha256 (a shard whose bytes changed is rewritten). The manifest is rewritten
atomically after each finished shard, so an interrupted run resumes where it stopped.

Shard sizes are fixed before any encoding: N samples go to ceil(N / samples_per_shard)
shards whose sizes differ by at most one (only write-time skips make a shard smaller), so
every reader gets nearly the same amount of data and few samples are dropped per epoch.
`--shard-bytes` is turned into a samples-per-shard count from the mean encoded size of the
first 64 samples. Samples are shuffled (seeded) before sharding, since a class-sorted
ImageFolder would otherwise give one-class shards.

Python 3.8 compatible.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import tarfile
import tempfile
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image

MANIFEST_FORMAT = "vit-accel-shards/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
_SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<index>\d{6})\.tar$")


class SourceSample(NamedTuple):
    """One image to write: from a file (`path`) or from memory (`data`)."""
    key: str
    label: int
    source: str                  # relative path or description, recorded in the sample's json
    path: Optional[str] = None
    data: Optional[bytes] = None


class ShardError(Exception):
    """A shard source or manifest problem; the message says what and how to fix it."""


# ----------------------------------------------------------------------------- manifest

def shard_name(name: str, index: int) -> str:
    return "%s-%06d.tar" % (name, index)


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_json(path: str, obj: Dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(path: str) -> Dict[str, Any]:
    """Load and check a manifest; ShardError naming the file and the problem otherwise."""
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError("cannot read shard manifest %s: %s" % (path, e)) from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ShardError("%s is not a vit-accel shard manifest (expected \"format\": %r)" % (path, MANIFEST_FORMAT))
    for i, s in enumerate(m.get("shards", [])):
        if not isinstance(s, dict) or "name" not in s or not isinstance(s.get("samples"), int):
            raise ShardError("%s: shard entry %d lacks name/samples" % (path, i))
    if not m.get("complete", False):
        raise ShardError("%s is incomplete (make-shards was interrupted): re-run the same make-shards "
                         "command to finish it" % (path,))
    return m


def verify_manifest(path: str) -> List[str]:
    """Recompute every local shard's sha256; returns the problems found (empty: all good)."""
    m = read_manifest(path)
    base = os.path.dirname(os.path.abspath(path))
    problems = []
    for s in m["shards"]:
        p = os.path.join(base, s["name"])
        if not os.path.exists(p):
            problems.append("%s: missing" % p)
        elif s.get("sha256") and file_sha256(p) != s["sha256"]:
            problems.append("%s: sha256 differs from the manifest (file changed or corrupt)" % p)
    return problems


# ----------------------------------------------------------------------------- sources

def _sanitize_key(text: str) -> str:
    # webdataset splits a member name at the first dot of its last path component, so keys
    # must not contain dots; slashes would make nested member names.
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text) or "_"


def _unique_keys(stems: Sequence[str]) -> List[str]:
    seen = {}  # type: Dict[str, int]
    keys = []
    for i, stem in enumerate(stems):
        key = _sanitize_key(stem)
        if key in seen:
            key = "%s_%d" % (key, i)
        seen[key] = i
        keys.append(key)
    return keys


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _samples_from_files(files: Sequence[Tuple[str, int]], root: str) -> List[SourceSample]:
    rels = [os.path.relpath(p, root) for p, _ in files]
    keys = _unique_keys([os.path.splitext(os.path.basename(r))[0] for r in rels])
    return [SourceSample(k, label, rel, path=p) for k, (p, label), rel in zip(keys, files, rels)]


def list_imagefolder(root: str, classes: Optional[List[str]] = None) -> Tuple[List[SourceSample], List[str]]:
    """ImageFolder: ROOT/<class>/<image>; classes are the sorted folder names (or `classes`)."""
    if not os.path.isdir(root):
        raise ShardError("--input %s is not a directory (ImageFolder needs ROOT/<class>/<image>)" % root)
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not found:
        raise ShardError("%s has no class folders (ImageFolder needs ROOT/<class>/<image>)" % root)
    classes = list(classes) if classes is not None else found
    index = {c: i for i, c in enumerate(classes)}
    files = []
    for c in found:
        if c not in index:
            raise ShardError("%s/%s is not one of the %d training classes" % (root, c, len(classes)))
        for dirpath, dirnames, names in os.walk(os.path.join(root, c)):
            dirnames.sort()
            files.extend((os.path.join(dirpath, n), index[c]) for n in sorted(names) if _is_image(n))
    if not files:
        raise ShardError("no images (%s) under %s" % ("/".join(IMAGE_EXTENSIONS), root))
    return _samples_from_files(files, root), classes


def read_imagenet_val_labels(path: str) -> Dict[str, str]:
    """Validation labels by file stem: LOC_val_solution.csv, or "filename label" lines.

    In "filename label" lines the label is a WordNet id (n01440764) or a 0-based index in
    sorted-WordNet-id order (the common `val.txt`). The devkit's 1-based
    ILSVRC2012_validation_ground_truth.txt uses another class order: use LOC_val_solution.csv.
    """
    labels = {}
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.startswith("ImageId"):
            for row in csv.DictReader(f):
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
        else:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ShardError("%s:%d: expected \"filename label\", got %r" % (path, n, line.strip()))
                labels[os.path.splitext(os.path.basename(parts[0]))[0]] = parts[1]
    if not labels:
        raise ShardError("%s holds no labels" % path)
    return labels


def list_imagenet(root: str, split: str, val_labels: Optional[str]) -> Tuple[List[SourceSample], List[str]]:
    """ImageNet layout: ROOT/train/<wnid>/*.JPEG; ROOT/val/*.JPEG + a label file (or class folders)."""
    train_dir, split_dir = os.path.join(root, "train"), os.path.join(root, split)
    classes = None
    if os.path.isdir(train_dir):
        classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if split == "train" or (os.path.isdir(split_dir) and any(
            os.path.isdir(os.path.join(split_dir, d)) for d in os.listdir(split_dir))):
        return list_imagefolder(split_dir, classes)
    if not val_labels:
        raise ShardError("--split %s of the ImageNet layout has flat files: pass --imagenet-val-labels "
                         "(LOC_val_solution.csv or \"filename label\" lines)" % split)
    if not os.path.isdir(split_dir):
        raise ShardError("%s is not a directory" % split_dir)
    labels = read_imagenet_val_labels(val_labels)
    if classes is None:  # no train folder: the label file's WordNet ids define the order
        classes = sorted(set(v for v in labels.values() if not v.isdigit()))
        if not classes:
            raise ShardError("numeric labels in %s need %s to name the classes" % (val_labels, train_dir))
    index = {c: i for i, c in enumerate(classes)}
    files = []
    for n in sorted(os.listdir(split_dir)):
        if not _is_image(n):
            continue
        stem = os.path.splitext(n)[0]
        if stem not in labels:
            raise ShardError("%s has no label in %s" % (n, val_labels))
        lab = labels[stem]
        label = int(lab) if lab.isdigit() else index.get(lab, -1)
        if not 0 <= label < len(classes):
            raise ShardError("%s: label %r is not one of the %d classes" % (n, lab, len(classes)))
        files.append((os.path.join(split_dir, n), label))
    if not files:
        raise ShardError("no images under %s" % split_dir)
    return _samples_from_files(files, split_dir), classes


def list_csv(path: str) -> Tuple[List[SourceSample], List[str]]:
    """CSV/TSV of `path,label` (header optional); paths relative to the file's folder.

    Integer labels are class indices; otherwise labels are class names, indexed in sorted order.
    """
    try:
        with open(path, newline="") as f:
            text = f.read()
    except OSError as e:
        raise ShardError("cannot read --input %s: %s" % (path, e)) from None
    delim = "\t" if path.endswith(".tsv") or "\t" in text.split("\n", 1)[0] else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delim) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    if not rows:
        raise ShardError("%s has no rows (expected path,label)" % path)
    for n, r in enumerate(rows, 1):
        if len(r) < 2:
            raise ShardError("%s row %d: expected path,label, got %r" % (path, n, delim.join(r)))
    base = os.path.dirname(os.path.abspath(path))
    raw = [r[1].strip() for r in rows]
    if all(x.isdigit() for x in raw):
        labels = [int(x) for x in raw]
        classes = [str(i) for i in range(max(labels) + 1)]
    else:
        classes = sorted(set(raw))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[x] for x in raw]
    files = [(os.path.join(base, r[0].strip()), lab) for r, lab in zip(rows, labels)]
    return _samples_from_files(files, base), classes


# ----------------------------------------------------------------------------- encoding

class _Skip(Exception):
    pass


def encode_sample(sample: SourceSample, resize: int, quality: int, verify: bool) -> Tuple[str, bytes]:
    """-> (extension, bytes). JPEG/PNG pass through unless resized; other formats become PNG.

    `resize` shrinks the shorter side (never enlarges) and re-encodes as JPEG at `quality`:
    done once here, it saves every epoch the decode of pixels the crop would throw away.
    """
    try:
        raw = sample.data if sample.data is not None else open(sample.path, "rb").read()
    except OSError as e:
        raise _Skip("unreadable file: %s" % e) from None
    try:
        img = Image.open(io.BytesIO(raw))
        fmt = img.format
        if resize and min(img.size) > resize:
            if fmt == "JPEG":
                img.draft("RGB", (resize, resize))  # DCT-domain downscale first: much cheaper than full decode
            img = img.convert("RGB")
            w, h = img.size
            size = (resize, max(1, round(h * resize / w))) if w <= h else (max(1, round(w * resize / h)), resize)
            out = io.BytesIO()
            img.resize(size, Image.BICUBIC).save(out, "JPEG", quality=quality)
            return "jpg", out.getvalue()
        if verify or fmt not in ("JPEG", "PNG"):
            img.load()  # a truncated or corrupt file fails here, at write time, not in every epoch
        if fmt == "JPEG":
            return "jpg", raw
        if fmt == "PNG":
            return "png", raw
        out = io.BytesIO()
        img.convert("RGB").save(out, "PNG")
        return "png", out.getvalue()
    except Exception as e:  # any PIL failure means "not an image we can use"
        what = "no image format PIL knows (damaged, or not an image)" if type(e).__name__ == "UnidentifiedImageError" \
            else "%s: %s" % (type(e).__name__, e)
        raise _Skip("not a readable image: %s" % what) from None


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same input, same sha256
    tar.addfile(info, io.BytesIO(data))


def _write_shard(task: Dict[str, Any]) -> Dict[str, Any]:
    """Write one shard to a temp file and rename it into place (a worker-process entry point)."""
    path, classes = task["path"], task["classes"]
    old = task.get("existing")
    if old and os.path.exists(path) and old.get("sha256") == file_sha256(path):
        return dict(old, reused=True)  # "skipped" of this shard came along from the old manifest
    skipped = []
    count = 0
    tmp = path + ".tmp-%d" % os.getpid()
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for s in task["samples"]:
            try:
                ext, data = encode_sample(s, task["resize"], task["quality"], task["verify"])
            except _Skip as e:
                skipped.append({"source": s.source, "reason": str(e), "shard": os.path.basename(path)})
                continue
            meta = {"label": s.label, "class": classes[s.label], "source": s.source}
            _add_member(tar, s.key + ".cls", str(s.label).encode())
            _add_member(tar, s.key + "." + ext, data)
            _add_member(tar, s.key + ".json", json.dumps(meta, sort_keys=True).encode())
            count += 1
    os.replace(tmp, path)
    return {"name": os.path.basename(path), "samples": count, "bytes": os.path.getsize(path),
            "sha256": file_sha256(path), "skipped": skipped, "reused": False}


def _plan_hash(samples: Sequence[SourceSample], options: Dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for s in samples:
        if s.data is not None:
            stamp = "%d" % len(s.data)
        else:  # a replaced source image changes the plan, so its shard is rewritten
            try:
                st = os.stat(s.path)
                stamp = "%d:%d" % (st.st_size, st.st_mtime_ns)
            except OSError:
                stamp = "missing"
        h.update(("%s\0%d\0%s\0%s\n" % (s.key, s.label, s.source, stamp)).encode())
    return h.hexdigest()


def _estimate_per_shard(samples: Sequence[SourceSample], shard_bytes: int, resize: int, quality: int) -> int:
    sizes = []
    for s in samples[:64]:
        try:
            sizes.append(len(encode_sample(s, resize, quality, verify=False)[1]))
        except _Skip:
            continue
    mean = sum(sizes) / len(sizes) if sizes else 1.0
    return max(1, int(shard_bytes // (mean + 3 * 1024)))  # 3 tar headers + padding per sample


def write_shards(samples: Sequence[SourceSample], out_dir: str, name: str, classes: Sequence[str],
                 samples_per_shard: int = 1000, shard_bytes: int = 0, resize: int = 0, quality: int = 90,
                 workers: int = 1, shuffle_seed: Optional[int] = 0, verify: bool = True,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Write `samples` as NAME-000000.tar... plus NAME.json under out_dir; returns the manifest.

    Re-running with the same inputs and options keeps every shard whose sha256 still
    matches the manifest and rewrites the others (changed, corrupt or missing).
    """
    if not samples:
        raise ShardError("no samples to write")
    samples = list(samples)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)
    os.makedirs(out_dir, exist_ok=True)
    if shard_bytes:
        samples_per_shard = _estimate_per_shard(samples, shard_bytes, resize, quality)
    n_shards = -(-len(samples) // max(1, samples_per_shard))
    bounds = [len(samples) * i // n_shards for i in range(n_shards + 1)]
    options = {"resize": resize, "quality": quality, "verify": verify, "shuffle_seed": shuffle_seed,
               "n_shards": n_shards, "classes": list(classes)}
    plan = _plan_hash(samples, options)
    manifest_path = os.path.join(out_dir, name + ".json")
    old_entries = {}  # type: Dict[str, Dict[str, Any]]
    old_names = []  # type: List[str]
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path) as f:
                old = json.load(f)
            old_names = [s["name"] for s in old.get("shards", [])]
            if old.get("plan") == plan:
                old_entries = {s["name"]: dict(s, skipped=[k for k in old.get("skipped", [])
                                                          if k.get("shard") == s["name"]])
                               for s in old.get("shards", []) if s.get("sha256")}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable manifest: rewrite everything
    tasks = []
    for i in range(n_shards):
        path = os.path.join(out_dir, shard_name(name, i))
        tasks.append({"path": path, "samples": samples[bounds[i]:bounds[i + 1]], "classes": list(classes),
                      "resize": resize, "quality": quality, "verify": verify,
                      "existing": old_entries.get(os.path.basename(path))})
    manifest = {"format": MANIFEST_FORMAT, "name": name, "complete": False, "plan": plan,
                "classes": list(classes), "num_classes": len(classes), "options": options,
                "shards": [], "skipped": [], "num_samples": 0}
    done = {}  # type: Dict[str, Dict[str, Any]]

    def record(result: Dict[str, Any]) -> None:
        done[result["name"]] = result
        entries = [done[shard_name(name, i)] for i in range(n_shards) if shard_name(name, i) in done]
        manifest["shards"] = [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in entries]
        manifest["skipped"] = [s for e in entries for s in e.get("skipped", [])]
        manifest["num_samples"] = sum(e["samples"] for e in entries)
        _atomic_write_json(manifest_path, manifest)
        if result.get("sha256") and result["name"] in old_entries and not result["reused"]:
            log("%s: sha256 did not match the manifest; rewritten" % result["name"])

    if workers > 1 and len(tasks) > 1:
        with multiprocessing.Pool(min(workers, len(tasks))) as pool:
            for result in pool.imap_unordered(_write_shard, tasks):
                record(result)
    else:
        for t in tasks:
            record(_write_shard(t))
    reused = sum(1 for r in done.values() if r["reused"])
    for stale in set(old_names) - set(done):  # shards of an earlier, larger plan of this NAME
        if _SHARD_RE.match(stale) and os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    manifest["complete"] = True
    _atomic_write_json(manifest_path, manifest)
    log("%s: %d shards, %d samples, %d skipped, %d shards reused -> %s"
        % (name, n_shards, manifest["num_samples"], len(manifest["skipped"]), reused, manifest_path))
    for s in manifest["skipped"][:5]:
        log("  skipped %s: %s" % (s["source"], s["reason"]))
    return manifest


# ----------------------------------------------------------------------------- CLI
