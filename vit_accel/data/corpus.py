"""ImageNet-like JPEGs from the photos that ship with installed packages, for benchmarks and tests.

ImageNet's training images are mostly about 500x375 (or 375x500) photographs saved as JPEG
at quality ~90. Timing a loader on noise or flat colours measures the wrong decoder work
(noise does not compress, flat colours decode in no time), so the corpus is cut from real
photographs: scikit-learn's `china.jpg` and `flower.jpg` (640x427) and matplotlib's
`grace_hopper.jpg` (512x600; left out where matplotlib is not installed). Image i takes one of them, a window of random position and size
(80..100% of the largest window of the output's aspect, so the content is never enlarged
much), an optional mirror and a mild per-channel gain, resampled to the output size with
Lanczos and encoded at `quality` with 4:2:0 chroma subsampling. Everything is drawn from
`random.Random(seed)`, so the same call writes the same bytes (for one Pillow build).

    write_photo_corpus("photos/", 1000)  # photos/<class>/<i>.jpg, an ImageFolder

Python 3.8 compatible.
"""
from __future__ import annotations

import io
import os
import random
from typing import List, Optional, Sequence, Tuple

from PIL import Image

def sample_photos() -> List[Image.Image]:
    """The source photographs as RGB images: scikit-learn's two, and matplotlib's one where matplotlib
    is installed (both are dependencies of this package; a GPU host may lack matplotlib)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    try:
        import matplotlib.cbook
    except ImportError:
        return photos
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(Image.open(f).convert("RGB"))
    return photos


def photo_jpeg(photo: Image.Image, rng: random.Random, size: Tuple[int, int], quality: int) -> bytes:
    """One corpus image: a random window of `photo`, resampled to `size` (w, h), JPEG at `quality`."""
    width, height = photo.size
    aspect = size[0] / size[1]
    full_w = min(width, height * aspect)  # the largest window of the output's aspect
    w = full_w * rng.uniform(0.8, 1.0)
    h = w / aspect
    left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
    img = photo.resize(size, Image.LANCZOS, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    gains = [rng.uniform(0.9, 1.1) for _ in range(3)]
    img = Image.merge("RGB", [band.point(lambda v, g=g: min(255, int(v * g))) for band, g in zip(img.split(), gains)])
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, subsampling="4:2:0")
    return out.getvalue()


def corpus_images(count: int, seed: int = 0, quality: int = 90,
                  photos: Optional[Sequence[Image.Image]] = None) -> List[bytes]:
    """`count` distinct JPEGs: landscape sources give 500x375, portrait ones 375x500."""
    photos = list(photos) if photos is not None else sample_photos()
    rng = random.Random("photo-corpus/%d" % seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        size = (500, 375) if photo.width >= photo.height else (375, 500)
        out.append(photo_jpeg(photo, rng, size, quality))
    return out


def write_photo_corpus(root: str, count: int, classes: int = 10, seed: int = 0, quality: int = 90) -> List[str]:
    """Write `count` corpus images as an ImageFolder, image i in class i % classes; returns the paths."""
    paths = []
    for i, data in enumerate(corpus_images(count, seed, quality)):
        folder = os.path.join(root, "class%02d" % (i % classes))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "%06d.jpg" % i)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths
