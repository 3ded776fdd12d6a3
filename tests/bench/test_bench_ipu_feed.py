"""IPU host feed: the images/s one loader process feeds, against what vit-b16-ft needs.

    pytest tests/bench/test_bench_ipu_feed.py -m bench -s

400 ImageNet-size JPEGs (500x375, ~87 KB, quality 90) written to shards here; the recipe's
train transform (RandomResizedCrop 224 bilinear + flip, uint8) in the loader's worker
processes, then normalize + fp16 in the IPU feed's thread (``ReadAhead``), as the IPU
backend feeds a call. Rates are images per CPU-second of the process doing the work, so
they do not depend on how many cores other processes take; the workers an instance needs
is the recipe's rate over one worker's. Needed: 5,600 images/s on 16 IPUs as 4 replicas of
a 4-IPU pipeline (reference ipu-recipe.md), 1,400 per 4-IPU instance.
"""
import math
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vit_accel.backends.ipu_feed import ReadAhead
from vit_accel.data.bench import _rate
from vit_accel.data.loader import TrainLoader
from vit_accel.data import resolve_shards

pytestmark = pytest.mark.bench

NEED_PER_INSTANCE = 1400
BATCH = 64


def _jpegs(root, n=400, classes=4):
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, "c%d" % (i % classes))
        os.makedirs(folder, exist_ok=True)
        low = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((500, 375), Image.BICUBIC)
        a = np.asarray(low).astype(np.int16) + rng.integers(-25, 26, (375, 500, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(os.path.join(folder, "%d.jpg" % i), quality=90)


def test_ipu_feed_rate_per_worker(tmp_path):
    from vit_accel.backends.ipu import IPUBackend
    from vit_accel.cli import main
    from vit_accel.config import load_recipe

    _prepare = IPUBackend(load_recipe("vit-b16-ft")).prepare          # normalize + fp16, as a call is fed

    _jpegs(str(tmp_path / "imgs"))
    assert main(["make-shards", "--source", "imagefolder", "--input", str(tmp_path / "imgs"),
                 "--output", str(tmp_path / "shards"), "--samples-per-shard", "100"]) == 0
    shards = resolve_shards(str(tmp_path / "shards" / "train.json"))
    rows = []
    for workers in (1, 2):
        plain = TrainLoader(shards, 224, BATCH, seed=0, workers=workers, shuffle_buffer=100)
        count = plain.batches_per_epoch * BATCH
        decode = _rate(plain, count)
        fed = _rate(ReadAhead(TrainLoader(shards, 224, BATCH, seed=0, workers=workers, shuffle_buffer=100),
                              _prepare, depth=2), count)
        rows.append((workers, decode, fed))
    u8 = torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8)
    torch.set_num_threads(1)
    start = time.process_time()
    for _ in range(10):
        x = _prepare(u8)
    prep = 10 * BATCH / (time.process_time() - start)
    assert x.dtype == torch.float16

    per_worker = rows[0][1][1]                  # decode + crop + flip, images per CPU-second, 1 worker
    print("\nIPU feed, 224 px crops of 500x375 JPEGs, batch %d, %d CPU cores here" % (BATCH, os.cpu_count()))
    print("%8s %16s %16s %18s %18s" % ("workers", "loader img/s", "feed img/s", "loader img/cpu-s",
                                       "feed img/cpu-s"))
    for w, d, f in rows:
        print("%8d %16.1f %16.1f %18.1f %18.1f" % (w, d[0], f[0], d[1], f[1]))
    print("normalize + fp16 in the feed thread: %.0f images per CPU-second (one thread)" % prep)
    print("one worker: %.0f images per CPU-second -> %d workers per 4-IPU instance for %d images/s, %d for "
          "5,600 on one host" % (per_worker, math.ceil(NEED_PER_INSTANCE / per_worker), NEED_PER_INSTANCE,
                                 math.ceil(4 * NEED_PER_INSTANCE / per_worker)))
    assert per_worker > 0 and prep > 0
