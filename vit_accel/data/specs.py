"""Shard specs (`data.train_shards` / `data.val_shards`) -> shard URLs with sample counts.

The forms:
  - a manifest `x/train.json` written by make-shards: its shards, counts, classes and sizes;
    its `base` (a folder, a URL or a `pipe:` command) replaces the manifest's folder;
  - a folder: its one manifest, or else every `*.tar` in it (sorted). A `pipe:` or URL base in
    that manifest is refused: name the manifest itself to use it;
  - explicit tar paths, or a brace pattern `x/train-{000000..000099}.tar`: exactly those files.
    From a complete manifest lying beside them that lists them all, only the sample counts are
    taken (a manifest nobody named never changes which files are read);
  - a URL or `pipe:` command as webdataset allows, e.g.
    `pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -` (opened with webdataset's gopen).

A manifest is read only when the user names it or its folder, and a command comes only from the
spec itself or from a manifest named by it. The first time a spec resolves to commands, the
process says so on stderr with the first command it will run (rank 0 of a launch), before any.

Shards without a manifest (written by other tools: a plain tar of `KEY.jpg` + `KEY.cls`) are
counted by scanning their tar headers once when the loader is built (local files seek over the
data; remote shards are streamed once). For object storage, keep the small manifest locally and
add `"base": "pipe:aws s3 cp s3://bucket/imagenet/{name} -"` to it: counts come from the file and
the bytes from the bucket.

Python 3.8 compatible.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional, Sequence, Set

from .reader import DataError, ShardList, count_samples, is_remote, local_path
from .shards import MANIFEST_FORMAT, ShardError, read_manifest

_ANNOUNCED: Set[str] = set()


def resolve_shards(spec: str) -> ShardList:
    """Shard spec -> urls with sample counts (see the module docstring for the forms)."""
    spec = (spec or "").strip()
    if not spec:
        raise DataError("no shards given: set data.train_shards / data.val_shards (a manifest .json, "
                        "a folder, a brace pattern or a URL), or data.source=digits")
    local = local_path(spec)
    if not is_remote(spec) and local.endswith(".json"):
        if not os.path.exists(local):
            raise DataError("shard manifest %s does not exist" % local)
        return _announced(_from_manifest(local, spec, named=True))
    if not is_remote(spec) and os.path.isdir(local):
        manifests = [n for n in sorted(os.listdir(local)) if n.endswith(".json")
                     and _is_manifest(os.path.join(local, n))]
        if len(manifests) == 1:
            return _from_manifest(os.path.join(local, manifests[0]), spec, named=False)
        if len(manifests) > 1:
            raise DataError("%s holds several manifests (%s): name one of them, e.g. %s"
                            % (local, ", ".join(manifests), os.path.join(local, manifests[0])))
        urls = [os.path.join(local, n) for n in sorted(os.listdir(local)) if n.endswith(".tar")]
        if not urls:
            raise DataError("folder %s holds no .tar shards and no manifest" % local)
        return _scanned(urls, spec)
    import braceexpand

    urls = list(braceexpand.braceexpand(spec))
    if is_remote(spec):
        return _scanned(urls, spec)
    urls = [local_path(u) for u in urls]
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise DataError("%d of %d shards of %s do not exist, e.g. %s" % (len(missing), len(urls), spec, missing[0]))
    counts = _counts_beside(urls)
    if counts is None:
        return _scanned(urls, spec)
    return ShardList(urls, counts, None, spec, [-1] * len(urls))


def _is_manifest(path: str) -> bool:
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT


def _from_manifest(path: str, spec: str, named: bool) -> ShardList:
    try:
        m = read_manifest(path)
    except ShardError as e:
        raise DataError(str(e)) from None
    base = m.get("base")
    if base is not None and not isinstance(base, str):
        raise DataError("%s: \"base\" must be a string (a folder, a URL or a pipe: command), got %r" % (path, base))
    if base and is_remote(base) and not named:
        raise DataError("%s (found in the folder %s) sets \"base\": %r, a URL or command; a manifest found in a "
                        "folder gives shard names and counts only. To read through that base, name the manifest "
                        "itself: data.*_shards=%s" % (path, spec, base, path))
    base = base or (os.path.dirname(os.path.abspath(path)) + os.sep)
    urls = [base.replace("{name}", s["name"]) if "{name}" in base else base + s["name"] for s in m["shards"]]
    return ShardList(urls, [s["samples"] for s in m["shards"]], m.get("classes"), spec,
                     [s.get("bytes", -1) if not m.get("base") else -1 for s in m["shards"]])


def _counts_beside(paths: Sequence[str]) -> Optional[List[int]]:
    """Sample counts of `paths` from a complete manifest in their folder that lists them all (else None)."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    names = [os.path.basename(p) for p in paths]
    for n in sorted(os.listdir(folder)):
        path = os.path.join(folder, n)
        if not n.endswith(".json") or not _is_manifest(path):
            continue
        try:
            m = read_manifest(path)
        except ShardError:
            continue
        counts = {s["name"]: s["samples"] for s in m["shards"]}
        if all(name in counts for name in names):
            return [counts[name] for name in names]
    return None


def _scanned(urls: List[str], spec: str) -> ShardList:
    _announce(spec, urls)                  # counting a remote shard runs its command
    return ShardList(urls, [count_samples(u) for u in urls], None, spec, [-1] * len(urls))


def _announced(shards: ShardList) -> ShardList:
    _announce(shards.source, shards.urls)
    return shards


def _announce(spec: str, urls: Sequence[str]) -> None:
    """Say once per spec, before the first one runs, that shards come from shell commands."""
    cmds = [u[len("pipe:"):] for u in urls if u.startswith("pipe:")]
    if not cmds or spec in _ANNOUNCED:
        return
    _ANNOUNCED.add(spec)
    if os.environ.get("RANK", "0") == "0":
        more = " (and %d more like it, one per shard)" % (len(cmds) - 1) if len(cmds) > 1 else ""
        print("vit-accel: shards of %s are read through shell commands; the first it will run: %s%s"
              % (spec, cmds[0], more), file=sys.stderr, flush=True)


def check_local_shards(shards: ShardList) -> None:
    """Cheap check before training: every local shard exists with the manifest's size."""
    for url, size in zip(shards.urls, shards.sizes):
        if is_remote(url):
            continue
        path = local_path(url)
        if not os.path.exists(path):
            raise DataError("shard %s (listed for %s) does not exist" % (path, shards.source))
        if size >= 0 and os.path.getsize(path) != size:
            raise DataError("shard %s has %d bytes but its manifest says %d: it is truncated or was "
                            "replaced; re-run the same make-shards command to rewrite it"
                            % (path, os.path.getsize(path), size))
