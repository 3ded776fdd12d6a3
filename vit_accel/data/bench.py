"""`vit-accel bench-data`: images/s of the shard loader against a plain ImageFolder + PIL loader.

Both sides run the same train transform (RandomResizedCrop + flip to uint8) with the same
number of DataLoader workers and batch size over the same number of images; the baseline
is the usual torch Dataset that opens each file with PIL. With --images DIR the baseline
reads that ImageFolder (e.g. the originals the shards were made from, so the gain of
make-shards --resize shows); without it the shards are extracted to a temporary
ImageFolder first (then the ratio is the reader's own gain).

    vit-accel bench-data --shards out/train.json --images originals/ --workers 1 2

With --rand-augment / --auto-augment / --random-erasing the same run also times the shard
loader with those per-sample augmentations over the same images (the recipe's pipeline
against the plain one), alternating with the others.

Python 3.8 compatible.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .loader import TrainLoader
from .reader import DataError, iter_records
from .specs import resolve_shards
from .shards import IMAGE_EXTENSIONS, ShardError
from .transforms import random_resized_crop_box, resample_filter


class ImageFolderBaseline(Dataset):
    """The reference point: one PIL open + full decode per file, then the same transform."""

    def __init__(self, root: str, img_size: int, interpolation: str = "bilinear"):
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files = [(os.path.join(root, c, n), i) for i, c in enumerate(classes)
                      for n in sorted(os.listdir(os.path.join(root, c))) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.files:
            raise DataError("no images in class folders under %s" % root)
        self.img_size, self.resample = img_size, resample_filter(interpolation)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        path, label = self.files[i]
        img = Image.open(path).convert("RGB")
        left, top, w, h = random_resized_crop_box(img.width, img.height, (0.08, 1.0), (0.75, 4 / 3), random)
        img = img.resize((self.img_size, self.img_size), self.resample, box=(left, top, left + w, top + h))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label


def extract_to_folder(spec: str, out: str) -> int:
    """Write every shard sample as OUT/<label>/<key>.<ext>; returns the count."""
    shards = resolve_shards(spec)
    n = 0
    for url in shards.urls:
        for _, rec in iter_records(url):
            ext = next((e for e in ("jpg", "jpeg", "png") if e in rec.files), None)
            if ext is None or "cls" not in rec.files:
                continue
            folder = os.path.join(out, rec.files["cls"].decode().strip())
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "%s.%s" % (rec.key.replace("/", "_"), ext)), "wb") as f:
                f.write(rec.files[ext])
            n += 1
    return n


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers, once joined)."""
    try:
        import resource
    except ImportError:  # not on Unix: wall time only
        return float("nan")
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _rate(batches: Any, count: int) -> Tuple[float, float]:
    """(images per wall second, images per CPU second) for the first `count` images."""
    cpu0, start = _cpu_seconds(), time.perf_counter()
    it = iter(batches)
    seen = 0
    for images, _ in it:
        seen += images.shape[0]
        if seen >= count:
            break
    wall = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()  # our loader is a generator: closing it shuts its workers down now
    del it  # joins the DataLoader workers, so their CPU time is counted
    return seen / wall, seen / max(_cpu_seconds() - cpu0, 1e-9)


Rate = Tuple[float, float]


def _best(a: Rate, b: Rate) -> Rate:
    return max(a[0], b[0]), max(a[1], b[1])


def run_bench(shards: str, images: str, workers: List[int], batch_size: int, img_size: int,
              decoder: str, repeat: int = 1, augment: Optional[Dict[str, Any]] = None,
              interpolation: str = "bilinear") -> List[Tuple[int, Rate, Rate, Optional[Rate]]]:
    """-> [(workers, ours, baseline, augmented or None)], each (images/s, images per CPU-second).
    Every loader times the same image count, alternating `repeat` times; the best run of each
    is kept (a shared machine only ever slows a run). Images per CPU-second is the per-worker
    efficiency and does not depend on how many cores other processes take. `augment`: the
    TrainLoader keywords (auto_augment, rand_augment, random_erasing, mean, std) of the
    augmented loader."""
    tmp = None
    try:
        if not images:
            tmp = tempfile.mkdtemp(prefix="vit-accel-bench-")
            extract_to_folder(shards, tmp)
            images = tmp
        baseline = ImageFolderBaseline(images, img_size, interpolation)
        rows = []  # type: List[Tuple[int, Rate, Rate, Optional[Rate]]]
        for n in workers:
            ours = TrainLoader(resolve_shards(shards), img_size, batch_size, seed=0, workers=n, decoder=decoder,
                               interpolation=interpolation)
            augmented = TrainLoader(resolve_shards(shards), img_size, batch_size, seed=0, workers=n, decoder=decoder,
                                    interpolation=interpolation, **augment) if augment else None
            count = min(ours.batches_per_epoch, len(baseline) // batch_size) * batch_size
            if count == 0:
                raise DataError("fewer than one batch (%d) of images to time" % batch_size)
            plain = DataLoader(baseline, batch_size=batch_size, shuffle=True, num_workers=n, drop_last=True)
            best_ours, best_plain, best_aug = (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)
            for _ in range(max(repeat, 1)):
                best_ours = _best(best_ours, _rate(ours, count))
                best_plain = _best(best_plain, _rate(plain, count))
                if augmented is not None:
                    best_aug = _best(best_aug, _rate(augmented, count))
            rows.append((n, best_ours, best_plain, best_aug if augmented is not None else None))
        return rows
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _augment_options(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The augmented loader's settings from the command line (None: no augmentation asked for)."""
    if not (args.auto_augment or args.rand_augment or args.random_erasing > 0):
        return None
    from types import SimpleNamespace

    from .augment import check_augment_settings

    check_augment_settings(SimpleNamespace(auto_augment=args.auto_augment, rand_augment=args.rand_augment,
                                           random_erasing=args.random_erasing, mixup=0.0, cutmix=0.0,
                                           mix_prob=1.0, mix_switch_prob=0.5))
    return dict(auto_augment=args.auto_augment, rand_augment=args.rand_augment,
                random_erasing=args.random_erasing, mean=args.mean, std=args.std)


def _bench_main(args: argparse.Namespace) -> int:
    try:
        augment = _augment_options(args)
        rows = run_bench(args.shards, args.images, args.workers, args.batch_size, args.img_size, args.decoder,
                         args.repeat, augment, args.interpolation)
    except (DataError, ShardError, OSError, ValueError) as e:
        print("bench-data: error: %s" % e, file=sys.stderr)
        return 2
    print("bench-data: batch %d, %dpx, RandomResizedCrop+flip (%s), decoder %s, best of %d; baseline: %s"
          % (args.batch_size, args.img_size, args.interpolation, args.decoder, max(args.repeat, 1),
             args.images or "shards extracted to an ImageFolder"))
    if augment:
        print("augmented: shards + %s" % ", ".join("%s=%s" % (k, v) for k, v in augment.items()
                                                   if v and k in ("auto_augment", "rand_augment", "random_erasing")))
    print("%8s %13s %13s %7s   %17s %17s %7s" % ("workers", "shards img/s", "folder img/s", "ratio",
                                                  "shards img/cpu-s", "folder img/cpu-s", "ratio")
          + ("   %15s %19s %9s" % ("augmented img/s", "augmented img/cpu-s", "aug/plain") if augment else ""))
    for n, ours, plain, aug in rows:
        line = "%8d %13.1f %13.1f %6.2fx   %17.1f %17.1f %6.2fx" % (
            n, ours[0], plain[0], ours[0] / plain[0], ours[1], plain[1], ours[1] / plain[1])
        if aug is not None:
            line += "   %15.1f %19.1f %8.2fx" % (aug[0], aug[1], aug[1] / ours[1])
        print(line)
    return 0


def add_bench_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench-data` on a `vit-accel` subparsers object."""
    p = subparsers.add_parser("bench-data", help="images/s of the shard loader vs an ImageFolder + PIL loader",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--shards", required=True, help="manifest .json, folder, brace pattern or URL of shards")
    p.add_argument("--images", default="", help="ImageFolder for the baseline (default: the shards, extracted)")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="DataLoader workers (one run per value)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--decoder", choices=["auto", "pil", "simplejpeg"], default="auto")
    p.add_argument("--repeat", type=int, default=1, help="alternate the loaders this many times, keep the best")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear",
                   help="crop resampling of every loader (and RandAugment's)")
    p.add_argument("--auto-augment", default="", help="also time the shards with this data.auto_augment (imagenet)")
    p.add_argument("--rand-augment", default="", help="also time the shards with this data.rand_augment, "
                   "e.g. rand-m9-mstd0.5-inc1")
    p.add_argument("--random-erasing", type=float, default=0.0, help="also time the shards with this "
                   "data.random_erasing probability")
    p.add_argument("--mean", type=float, nargs=3, default=[123.675, 116.28, 103.53],
                   help="normalization mean (0..255): RandAugment's fill and erasing's fill mean")
    p.add_argument("--std", type=float, nargs=3, default=[58.395, 57.12, 57.375], help="erasing's fill std")
    p.set_defaults(func=_bench_main)
    return p
