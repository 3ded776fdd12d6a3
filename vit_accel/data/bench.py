"""`vit-accel bench-data`: our input pipelines against torchvision's and timm's own, per CPU-second.

One run times, per worker count, each of our pipelines and its baseline (the library's own
objects, `bench_baselines.py`) over the same images with the same workers and batch, each pair
alternating `--repeat` times (best run kept: a shared machine only ever slows a run):

    train           RandomResizedCrop + flip, uint8           vs torchvision ImageFolder + v2
    train-vs-timm   (the same run of ours)                    vs timm's create_transform(is_training=True)
    rand-augment    + RandAugment rand-m9-mstd0.5-inc1 + erasing 0.25, bicubic   vs timm's
    auto-augment    + AutoAugment imagenet                    vs torchvision + v2.AutoAugment
    eval            resize 256 + center crop 224              vs torchvision Resize + CenterCrop
    gpu-decode      data.decode=gpu (host: headers + boxes)   vs ours with data.decode=cpu (CUDA only)

Images per CPU-second (the CPU time of the loader's process and its workers, from the first batch
on) is the rate one core sustains, and holds on a loaded machine where images/s does not. The input is `--corpus N`
ImageNet-like photos (`corpus.py`, written once to `--corpus-dir` or a temporary folder, then
sharded), an ImageFolder (`--images`), or shards (`--shards`, extracted for the baselines).

    vit-accel bench-data --corpus 1000 --workers 0 1 2 --repeat 2 --json bench-data.json

Python 3.8 compatible.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .bench_baselines import BASELINES, baseline_loader
from .eval_loader import EvalLoader
from .loader import TrainLoader
from .reader import DataError, iter_records
from .shards import ShardError, list_imagefolder, write_shards
from .specs import resolve_shards
from .transforms import DECODERS, describe_decoder, resolve_decoder

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
IMAGENET_MEAN, IMAGENET_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
# pipeline -> (what ours runs, the baseline it is measured against)
PIPELINES = {
    "train": ("RandomResizedCrop + flip, bilinear, uint8", "torchvision"),
    "train-vs-timm": ("the same loader as train (one measurement)", "timm"),
    "rand-augment": ("+ RandAugment %s + random erasing 0.25, bicubic" % RAND_AUGMENT, "timm-rand-augment"),
    "auto-augment": ("+ AutoAugment imagenet, bilinear", "torchvision-auto-augment"),
    "eval": ("resize shorter side to img_size / 0.875 + center crop, bilinear", "torchvision-eval"),
    "gpu-decode": ("data.decode=gpu: JPEG bytes, boxes and flips to the device; decode, crop, flip there",
                   "ours-cpu-decode"),
}
CPU_DECODE = "our train loader, data.decode=cpu (the train row's)"
ROW_KEYS = ("pipeline", "workers", "images_per_second", "images_per_cpu_second", "baseline",
            "baseline_images_per_second", "baseline_images_per_cpu_second")


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


def _cpu_seconds(self: bool = True, children: bool = True) -> float:
    """CPU time of this process and/or its reaped children (the DataLoader workers, once joined)."""
    try:
        import resource
    except ImportError:  # not on Unix: no CPU time
        return float("nan")
    total = 0.0
    for who, wanted in ((resource.RUSAGE_SELF, self), (resource.RUSAGE_CHILDREN, children)):
        if wanted:
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
    return total


def tree_cpu_seconds() -> Optional[float]:
    """CPU seconds so far of this process and its live descendants (Linux /proc), None elsewhere."""
    if not os.path.isdir("/proc/self"):
        return None
    ticks = float(os.sysconf("SC_CLK_TCK"))
    parent, cpu = {}, {}  # type: Dict[int, int], Dict[int, int]
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                text = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... utime stime
        parent[int(name)], cpu[int(name)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(p for p, pp in parent.items() if pp == pid and p not in tree)
    return sum(cpu.get(p, 0) for p in tree) / ticks


Rate = Tuple[float, float]


def _rate(make: Callable[[], Any], count: int) -> Rate:
    """(images per wall second, images per CPU second) over `count` images of a fresh loader.

    Timed from its first batch on: worker start-up is a per-epoch cost, which an ImageNet epoch
    spreads over thousands of batches and this short run would not. Where /proc is missing,
    everything from the start counts (this process and its joined workers)."""
    import gc

    loader = make()
    it = iter(loader)
    next(it)
    tree0, cpu0, start = tree_cpu_seconds(), _cpu_seconds(), time.perf_counter()
    seen = 0
    for batch in it:
        seen += batch[0].shape[0]
        if seen >= count:
            break
    wall = time.perf_counter() - start
    tree1, own = tree_cpu_seconds(), _cpu_seconds(children=False)
    if hasattr(it, "close"):
        it.close()  # our loader is a generator: closing it shuts its workers down now
    del it, loader
    gc.collect()  # joins the DataLoader workers (their CPU time counts where /proc is missing)
    cpu = tree1 - tree0 if tree0 is not None and tree1 is not None else own + _cpu_seconds(self=False) - cpu0
    return seen / wall, seen / max(cpu, 1e-9)


def _best(a: Rate, b: Rate) -> Rate:
    return max(a[0], b[0]), max(a[1], b[1])


def _ours(pipeline: str, shards: str, img_size: int, batch_size: int, workers: int, decoder: str,
          device: str) -> Callable[[], Any]:
    """A factory of our loader for `pipeline` (a fresh one per timed run: each starts at batch 0)."""
    def train(**kw: Any) -> Callable[[], Any]:
        return lambda: TrainLoader(resolve_shards(shards), img_size, batch_size, seed=0, workers=workers,
                                   decoder=decoder, **kw)

    if pipeline in ("train", "train-vs-timm"):
        return train()
    if pipeline == "rand-augment":
        return train(interpolation="bicubic", rand_augment=RAND_AUGMENT, random_erasing=0.25, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD)
    if pipeline == "auto-augment":
        return train(auto_augment="imagenet")
    if pipeline == "gpu-decode":
        return train(decode="gpu", decode_device=device)
    return lambda: EvalLoader(resolve_shards(shards), img_size, batch_size, workers=workers,
                              resize=eval_resize(img_size), decoder=decoder)


def eval_resize(img_size: int) -> int:
    """The shorter side before the center crop: img_size / 0.875 (256 at 224), torchvision's recipe."""
    return int(math.floor(img_size / 0.875))


def _count(shards: str, images: str, batch_size: int, workers: int) -> int:
    """Images to time after the first batch: a batch short of the smaller epoch (no side reaches its end)."""
    ours = TrainLoader(resolve_shards(shards), 8, batch_size, seed=0, workers=workers).batches_per_epoch
    theirs = len(list_imagefolder(images)[0]) // batch_size
    batches = min(ours, theirs) - 2
    if batches < 1:
        raise DataError("too few images to time: %d batches of %d per epoch with %d worker(s); use more images "
                        "(--corpus N) or a smaller --batch-size" % (min(ours, theirs), batch_size, workers))
    return batches * batch_size


def run_bench(shards: str, images: str, workers: List[int], batch_size: int, img_size: int, pipelines: List[str],
              repeat: int = 1, decoder: str = "auto", device: str = "cuda",
              log: Callable[[str], None] = lambda m: None) -> List[Dict[str, Any]]:
    """One row (ROW_KEYS) per pipeline x workers; best of `repeat` alternating runs of each side."""
    rows = []  # type: List[Dict[str, Any]]
    for n in workers:
        count = _count(shards, images, batch_size, n)
        sides = {}  # type: Dict[str, Callable[[], Any]]  # each loader once, even when two rows share it
        for p in pipelines:
            ours, base = _sides(p)
            sides.setdefault(ours, _ours(ours[5:], shards, img_size, batch_size, n, decoder, device))
            if base == "ours:train":
                sides.setdefault(base, _ours("train", shards, img_size, batch_size, n, decoder, device))
            else:
                sides.setdefault(base, functools.partial(baseline_loader, base[5:], images, img_size, batch_size, n,
                                                         eval_resize(img_size)))
        best = {k: (0.0, 0.0) for k in sides}  # type: Dict[str, Rate]
        for r in range(max(repeat, 1)):
            for key, make in sides.items():
                rate = _rate(make, count)
                best[key] = _best(best[key], rate)
                log("workers %d, run %d: %-30s %8.1f img/s %8.1f img/cpu-s" % (n, r + 1, key, rate[0], rate[1]))
        for p in pipelines:
            ours, base = _sides(p)
            rows.append(dict(zip(ROW_KEYS, (p, n, round(best[ours][0], 1), round(best[ours][1], 1), PIPELINES[p][1],
                                            round(best[base][0], 1), round(best[base][1], 1)))))
    return rows


def _sides(pipeline: str) -> Tuple[str, str]:
    """The keys of the two loaders a pipeline's row compares ("ours:NAME", "base:NAME" or "ours:train")."""
    ours = "ours:train" if pipeline == "train-vs-timm" else "ours:" + pipeline
    return ours, "ours:train" if pipeline == "gpu-decode" else "base:" + PIPELINES[pipeline][1]


# ----------------------------------------------------------------------------- inputs

def _prepare(args: argparse.Namespace, tmp: str, log: Callable[[str], None]) -> Tuple[str, str, str]:
    """(shard spec, ImageFolder root, a description of the images) from --corpus / --images / --shards."""
    images, shards = args.images, args.shards
    what = ""
    if args.corpus:
        from .corpus import write_photo_corpus

        images = args.corpus_dir or os.path.join(tmp, "photos")
        if not (os.path.isdir(images) and len(list_imagefolder(images)[0]) == args.corpus):
            if os.path.isdir(images) and os.listdir(images):
                raise DataError("--corpus-dir %s holds other files than a corpus of %d: give an empty or new folder"
                                % (images, args.corpus))
            log("writing %d corpus photos to %s" % (args.corpus, images))
            write_photo_corpus(images, args.corpus)
        what = "photo corpus"
    if not shards:
        if not images:
            raise DataError("give --corpus N, --images DIR or --shards SPEC")
        samples, classes = list_imagefolder(images)
        per_shard = max(1, -(-len(samples) // max(8, max(args.workers))))
        write_shards(samples, os.path.join(tmp, "shards"), "train", classes, samples_per_shard=per_shard,
                     workers=1, verify=False, log=lambda m: None)
        shards = os.path.join(tmp, "shards", "train.json")
    elif not images:
        images = os.path.join(tmp, "extracted")
        extract_to_folder(shards, images)
        what = what or "the shards' images"
    files = [s.path for s in list_imagefolder(images)[0]]
    sizes = [os.path.getsize(f) for f in files]
    return shards, images, "%d %s (%s), mean %.0f KB" % (len(files), what or "images", images,
                                                         sum(sizes) / max(len(sizes), 1) / 1024)


def _bench_main(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        if args.verbose:
            print(msg, file=sys.stderr, flush=True)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers=0 too runs one intra-op thread per loader, as DataLoader workers do
    tmp = tempfile.mkdtemp(prefix="vit-accel-bench-")
    try:
        pipelines = _pipelines(args.pipelines, args.device)
        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        shards, images, described = _prepare(args, tmp, log)
        rows = run_bench(shards, images, args.workers, args.batch_size, args.img_size, pipelines, args.repeat,
                         args.decoder, args.device, log)
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    except (DataError, ShardError, OSError, ValueError) as e:
        print("bench-data: error: %s" % e, file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)
    print("bench-data: %s; batch %d, %d px, best of %d; load average %.1f -> %.1f on %d cores; our decoder %s"
          % (described, args.batch_size, args.img_size, max(args.repeat, 1), load0, load1, os.cpu_count() or 0,
             describe_decoder(resolve_decoder(args.decoder))))
    print("%7s %-14s %11s %14s %15s %18s %8s" % ("workers", "pipeline", "ours img/s", "ours img/cpu-s",
                                                 "baseline img/s", "baseline img/cpu-s", "ratio"))
    for r in rows:
        print("%7d %-14s %11.1f %14.1f %15.1f %18.1f %7.2fx"
              % (r["workers"], r["pipeline"], r["images_per_second"], r["images_per_cpu_second"],
                 r["baseline_images_per_second"], r["baseline_images_per_cpu_second"],
                 r["images_per_cpu_second"] / max(r["baseline_images_per_cpu_second"], 1e-9)))
    print("ratio: images per CPU-second, ours / baseline. Pipelines:")
    for p in pipelines:
        ours, base = PIPELINES[p]
        print("  %-14s ours: %s\n  %-14s baseline (%s): %s" % (p, ours, "", base, BASELINES.get(base, CPU_DECODE)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _pipelines(names: List[str], device: str) -> List[str]:
    """The pipelines to run: as named, or all of them (gpu-decode only where the device exists)."""
    if names:
        unknown = [p for p in names if p not in PIPELINES]
        if unknown:
            raise ValueError("unknown pipeline(s) %s; choose from %s" % (", ".join(unknown), ", ".join(PIPELINES)))
        return list(names)
    import torch

    has_device = not device.startswith("cuda") or torch.cuda.is_available()
    return [p for p in PIPELINES if p != "gpu-decode" or has_device]


def add_bench_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench-data` on a `vit-accel` subparsers object."""
    p = subparsers.add_parser("bench-data", help="input pipelines per CPU-second vs torchvision's and timm's own",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--corpus", type=int, default=0, help="time on this many ImageNet-like photos (data/corpus.py)")
    p.add_argument("--corpus-dir", default="", help="keep the corpus here and reuse it (default: a temporary folder)")
    p.add_argument("--images", default="", help="an ImageFolder to time on (sharded for ours)")
    p.add_argument("--shards", default="", help="shards to time ours on (manifest, folder, brace pattern or URL); "
                   "the baselines read their images, extracted, unless --images is given")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="DataLoader workers (one run per value)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--pipelines", nargs="+", default=[], metavar="NAME",
                   help="some of %s (default: all; gpu-decode where CUDA is)" % ", ".join(PIPELINES))
    p.add_argument("--decoder", choices=DECODERS, default="auto", help="our full-size JPEG decoder (data.decoder)")
    p.add_argument("--device", default="cuda", help="gpu-decode's device (cpu runs its code with the CPU decoder)")
    p.add_argument("--repeat", type=int, default=1, help="alternate the loaders this many times, keep the best")
    p.add_argument("--json", default="", help="write the rows to this file")
    p.add_argument("--verbose", action="store_true", help="log every timed run to stderr")
    p.set_defaults(func=_bench_main)
    return p
