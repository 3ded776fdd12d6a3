"""The embedded default dataset: scikit-learn's bundled digits as webdataset shards.

`sklearn.datasets.load_digits` ships 1,797 8x8 grey digits (values 0..16) inside the
package, so nothing is downloaded. They are split once with a fixed seed into 1,437 train /
360 val, upsampled to 32x32 (PIL bilinear, scaled to 0..255), stored as grey PNG (decoded
to RGB by the loader) in 4 train shards (360/359/359/359: 2 ranks x 2 workers is valid) and
2 val shards, with manifests. Because they go through the same writer and reader as
ImageNet, the default run exercises the whole input pipeline in minutes on a CPU.

Python 3.8 compatible.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import os
import shutil
import tempfile
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image

from .shards import ShardError, SourceSample, verify_manifest, write_shards

DIGITS_SIZE = 32
NUM_VAL = 360
SPLIT_SEED = 0
CLASSES = [str(i) for i in range(10)]
_log = logging.getLogger("vit_accel.data")


def _png(pixels: np.ndarray) -> bytes:
    grey = Image.fromarray(np.clip(pixels * (255.0 / 16.0), 0, 255).round().astype(np.uint8), mode="L")
    out = io.BytesIO()
    grey.resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR).save(out, "PNG")
    return out.getvalue()


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64, target [1797] int): `sklearn.datasets.load_digits`'s arrays.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: 64 pixel
    columns, then the label), the way load_digits reads it, without importing sklearn.datasets
    (about a second of CPU: SciPy and the rest of the datasets module); load_digits itself where
    that file is not there.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits  # scikit-learn is only needed for this dataset

    d = load_digits()
    return d.images, d.target


def digits_samples() -> Tuple[List[SourceSample], List[SourceSample]]:
    """(train, val) samples, PNG bytes in memory; the split depends only on SPLIT_SEED."""
    images, target = digits_arrays()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(target))
    samples = [SourceSample("digits_%04d" % i, int(target[i]), "sklearn.datasets.load_digits[%d]" % i,
                            data=_png(images[i])) for i in order]
    return samples[NUM_VAL:], samples[:NUM_VAL]


def write_digits(out_dir: str, workers: int = 1, log: Callable[[str], None] = _log.info) -> None:
    """Write train-00000{0..3}.tar, val-00000{0,1}.tar and train.json / val.json into out_dir."""
    train, val = digits_samples()
    # Already in a seeded random order: no second shuffle, so shard contents never change.
    write_shards(train, out_dir, "train", CLASSES, samples_per_shard=360, workers=workers,
                 shuffle_seed=None, log=log)
    write_shards(val, out_dir, "val", CLASSES, samples_per_shard=180, workers=workers, shuffle_seed=None, log=log)


def _valid(folder: str) -> bool:
    try:
        return all(os.path.exists(os.path.join(folder, n + ".json")) and not verify_manifest(
            os.path.join(folder, n + ".json")) for n in ("train", "val"))
    except ShardError:
        return False


def ensure_digits(root: str, log: Optional[Callable[[str], None]] = None) -> Tuple[str, str, int]:
    """Write the digits shards under ROOT/digits once -> (train manifest, val manifest, num_classes).

    Idempotent (a later call checks the sha256 of the 6 small shards and returns) and safe
    when several processes (ranks) call it at once: each writes into its own temporary
    folder and renames it into place; a rename is atomic, so the losers find a complete
    folder and delete their copy.
    """
    target = os.path.join(os.path.abspath(root), "digits")
    result = (os.path.join(target, "train.json"), os.path.join(target, "val.json"), len(CLASSES))
    if _valid(target):
        return result
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-tmp-", dir=os.path.dirname(target))
    try:
        write_digits(tmp, log=lambda msg: None)
        for _ in range(3):
            try:
                os.rename(tmp, target)
                (log or _log.info)("wrote the digits dataset to %s" % target)
                return result
            except OSError:  # the target exists: complete (another process won) or damaged
                if _valid(target):
                    return result
                aside = tempfile.mkdtemp(prefix=".digits-bad-", dir=os.path.dirname(target))
                try:
                    os.rename(target, os.path.join(aside, "digits"))
                except OSError:
                    pass  # someone else moved it first; retry the rename
                shutil.rmtree(aside, ignore_errors=True)
        raise ShardError("could not install the digits shards at %s (is it writable?)" % target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
