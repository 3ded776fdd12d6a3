"""`vit-accel make-shards`: webdataset shards + manifest from an image tree, a CSV, or the digits.

Python 3.8 compatible.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable

from .digits import write_digits
from .imagefolder import split_imagefolder, write_split
from .shards import ShardError, list_csv, list_imagenet, write_shards

MIN_SHARDS = 8   # imagefolder's default: 2 ranks x 4 workers each read a shard of their own


def parse_size(text: str) -> int:
    """"100MB" / "1.5GB" / "250000" -> bytes."""
    m = re.match(r"^\s*([\d.]+)\s*([kKmMgG]?)i?[bB]?\s*$", text)
    if not m:
        raise argparse.ArgumentTypeError("expected a size such as 250MB or 1GB, got %r" % text)
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])


def _make_shards_main(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        if args.source == "digits":
            write_digits(args.output, workers=args.workers, log=log)
            return 0
        if not args.input:
            raise ShardError("--input is required for --source %s" % args.source)
        if args.source == "imagefolder":
            _imagefolder(args, log)
            return 0
        if args.source == "imagenet":
            samples, classes = list_imagenet(args.input, args.split, args.imagenet_val_labels)
        else:
            samples, classes = list_csv(args.input)
        name = args.name or (args.split if args.source == "imagenet" else "train")
        _write(args, samples, name, classes, log)
        return 0
    except (ShardError, OSError) as e:
        print("make-shards: error: %s" % e, file=sys.stderr)
        return 2


def _write(args: argparse.Namespace, samples: Any, name: str, classes: Any, log: Callable[[str], None]) -> Any:
    return write_shards(samples, args.output, name, classes, samples_per_shard=_per_shard(args, len(samples)),
                        shard_bytes=args.shard_bytes or 0, resize=args.resize, quality=args.quality,
                        workers=args.workers, shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
                        verify=not args.no_verify, log=log)


def _per_shard(args: argparse.Namespace, n: int) -> int:
    """--samples-per-shard, else 1000; a photo folder of a few hundred images still gets MIN_SHARDS shards,
    since every loader process (ranks x data.workers) needs one to read."""
    if args.samples_per_shard:
        return args.samples_per_shard
    if args.source != "imagefolder":
        return 1000
    return min(1000, max(16, -(-n // MIN_SHARDS)))


def _imagefolder(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """Training and validation shards of a photo folder, with the per-class counts of each."""
    split = split_imagefolder(args.input, args.val_fraction, args.split_seed)
    train_name = args.name or "train"
    val_name = args.name + "-val" if args.name else "val"

    def quiet(msg: str) -> None:  # write_split lists every skipped file itself, not only the first five
        if not msg.startswith("  skipped "):
            log(msg)

    write_split(split, args.output, train_name, val_name,
                lambda samples, name: _write(args, samples, name, split.classes, quiet), log)


def add_make_shards_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `make-shards` on a `vit-accel` subparsers object."""
    p = subparsers.add_parser(
        "make-shards", help="write webdataset shards + manifest from images",
        description="Write NAME-000000.tar ... and NAME.json (manifest with sample counts and sha256) "
                    "from an ImageFolder tree, the ImageNet layout, a CSV/TSV of path,label, or the "
                    "bundled digits. An ImageFolder gives train.json and val.json: from its train/ and val/ "
                    "folders, else by holding out --val-fraction of each class. Re-running skips shards "
                    "that are complete and unchanged.")
    p.add_argument("--source", choices=["imagefolder", "imagenet", "csv", "digits"], default="imagefolder")
    p.add_argument("--input", help="ImageFolder root (ROOT/<class>/ or ROOT/train/<class>/ + ROOT/val/<class>/), "
                                   "ImageNet root (with train/ and val/), or the CSV/TSV file")
    p.add_argument("--output", required=True, help="folder for the shards and NAME.json")
    p.add_argument("--name", default="", help="shard name prefix (default: train, or the ImageNet split)")
    p.add_argument("--split", choices=["train", "val"], default="train", help="ImageNet split to write")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="imagefolder without train/ and val/ folders: the share of each class held out as val.json "
                        "(seeded, per class; 0 = none)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out draw (--val-fraction)")
    p.add_argument("--imagenet-val-labels", default="",
                   help="LOC_val_solution.csv, or lines 'FILENAME LABEL' (WordNet id or 0-based sorted index)")
    p.add_argument("--samples-per-shard", type=int, default=0,
                   help="samples in each shard (default 1000; imagefolder: fewer for small folders, so that "
                        "there are %d shards for the loader processes to share, with 16 samples at least)"
                   % MIN_SHARDS)
    p.add_argument("--shard-bytes", type=parse_size, default=0,
                   help="target shard size (e.g. 256MB); overrides --samples-per-shard")
    p.add_argument("--resize", type=int, default=0,
                   help="shrink the shorter side to this many pixels and re-encode as JPEG (0: keep bytes)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the sample order across shards")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--no-verify", action="store_true",
                   help="do not fully decode pass-through images at write time (faster; bad images "
                        "are then skipped at read time)")
    p.set_defaults(func=_make_shards_main)
    return p
