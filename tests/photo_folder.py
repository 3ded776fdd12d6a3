"""A folder of photo-like JPEGs in three classes, written by the tests that need one.

``flower`` and ``temple`` are random crops of the two photos scikit-learn ships
(``load_sample_images``: a flower and a Chinese temple), ``shapes`` dark ellipses and boxes
rendered on light backgrounds: real photographic texture, distinct enough that a tiny model
separates the classes in a few dozen steps.
"""
import os
from pathlib import Path
from typing import Dict

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["flower", "shapes", "temple"]


def _crop(photo: np.ndarray, rng: np.random.RandomState, size: int) -> Image.Image:
    h, w = photo.shape[:2]
    s = rng.randint(min(h, w) // 2, min(h, w))
    y, x = rng.randint(0, h - s), rng.randint(0, w - s)
    return Image.fromarray(photo[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR)


def _shape(rng: np.random.RandomState, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.randint(190, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randint(0, size // 2, 2)
        x1, y1 = x0 + rng.randint(size // 4, size // 2), y0 + rng.randint(size // 4, size // 2)
        fill = tuple(int(v) for v in rng.randint(0, 90, 3))
        (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return img


def write_photos(root: Path, per_class: int = 24, size: int = 48, seed: int = 0) -> Dict[str, int]:
    """ROOT/<class>/<class>_NNN.jpg for the three classes; returns {class: images written}."""
    from sklearn.datasets import load_sample_images

    flower, temple = sorted(load_sample_images().filenames, key=lambda p: "china" in p)  # flower.jpg, china.jpg
    photos = {"flower": np.asarray(Image.open(flower)), "temple": np.asarray(Image.open(temple))}
    rng = np.random.RandomState(seed)
    for name in CLASSES:
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            img = _shape(rng, size) if name == "shapes" else _crop(photos[name], rng, size)
            img.save(root / name / ("%s_%03d.jpg" % (name, i)), quality=88)
    return {name: per_class for name in CLASSES}
