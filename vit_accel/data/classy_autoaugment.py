"""ClassyVision's ImageNet AutoAugment, reproduced: what `data.auto_augment: imagenet` runs.

The ClassyVision rows (examples/vit/*.json) train with its ``imagenet_autoaugment`` transform
(ClassyVision 0.7.0, ``classy_vision/dataset/transforms/autoaugment.py``, after DeepVoltaire's
AutoAugment): one of 24 sub-policies chosen uniformly, each two ops applied with their own
probabilities, on the PIL image. tests/test_classy_autoaugment.py runs ClassyVision's own transform
beside this one: the same pixels under the same seed. Where torchvision's ``AutoAugment(IMAGENET)``,
the nearest library op, differs (so it is not used):

* rotations turn counter-clockwise only (the magnitude's sign is never drawn), nearest resampling,
  the uncovered corners middle gray;
* shears resample bicubic; translations nearest; both fill middle gray, their sign drawn;
* solarize inverts pixels at or above ``linspace(256, 0, 10)[m]`` (256 at magnitude 0: no pixel);
* posterize keeps ``round(linspace(8, 4, 10))[m]`` bits;
* 24 sub-policies: torchvision's IMAGENET list has a 25th that repeats the third.

Randomness: python's global ``random``, drawn in ClassyVision's order (sub-policy, first op's
probability, its sign, second op's probability, its sign); ``SampleAugment`` seeds it from the
sample's generator around the call, so a sample's augmentation is a function of its seed.

Python 3.8 / torch 2.0 compatible (the data package is imported on IPU hosts); needs only PIL.
"""
from __future__ import annotations

import random
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MIDDLE_GRAY = (128, 128, 128)


def _sign() -> int:
    return random.choice((-1, 1))


def _shear(axis: int) -> Callable[..., Any]:
    def op(img: Any, m: float, fill: Tuple[int, int, int]) -> Any:
        k = m * _sign()
        coeffs = (1, k, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, k, 1, 0)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BICUBIC, fillcolor=fill)
    return op


def _translate(axis: int) -> Callable[..., Any]:
    def op(img: Any, m: float, fill: Tuple[int, int, int]) -> Any:
        shift = m * img.size[axis] * _sign()
        coeffs = (1, 0, shift, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, shift)
        return img.transform(img.size, Image.AFFINE, coeffs, fillcolor=fill)
    return op


def _rotate(img: Any, m: float, fill: Tuple[int, int, int]) -> Any:
    turned = img.convert("RGBA").rotate(m)
    return Image.composite(turned, Image.new("RGBA", turned.size, (128,) * 4), turned).convert(img.mode)


def _enhance(kind: Any) -> Callable[..., Any]:
    def op(img: Any, m: float, fill: Tuple[int, int, int]) -> Any:
        return kind(img).enhance(1 + m * _sign())
    return op


# op name -> (magnitude by level 0..9, the op)
OPS = {
    "ShearX": (np.linspace(0, 0.3, 10), _shear(0)),
    "ShearY": (np.linspace(0, 0.3, 10), _shear(1)),
    "TranslateX": (np.linspace(0, 150 / 331, 10), _translate(0)),
    "TranslateY": (np.linspace(0, 150 / 331, 10), _translate(1)),
    "Rotate": (np.linspace(0, 30, 10), _rotate),
    "Color": (np.linspace(0.0, 0.9, 10), _enhance(ImageEnhance.Color)),
    "Posterize": (np.round(np.linspace(8, 4, 10), 0).astype(int), lambda img, m, fill: ImageOps.posterize(img, int(m))),
    "Solarize": (np.linspace(256, 0, 10), lambda img, m, fill: ImageOps.solarize(img, m)),
    "Contrast": (np.linspace(0.0, 0.9, 10), _enhance(ImageEnhance.Contrast)),
    "Sharpness": (np.linspace(0.0, 0.9, 10), _enhance(ImageEnhance.Sharpness)),
    "Brightness": (np.linspace(0.0, 0.9, 10), _enhance(ImageEnhance.Brightness)),
    "AutoContrast": ([0] * 10, lambda img, m, fill: ImageOps.autocontrast(img)),
    "Equalize": ([0] * 10, lambda img, m, fill: ImageOps.equalize(img)),
    "Invert": ([0] * 10, lambda img, m, fill: ImageOps.invert(img)),
}

# ClassyVision's 24 sub-policies: ((op, level, probability), (op, level, probability))
IMAGENET_POLICY = [
    (("Posterize", 8, .4), ("Rotate", 9, .6)), (("Solarize", 5, .6), ("AutoContrast", 5, .6)),
    (("Equalize", 8, .8), ("Equalize", 3, .6)), (("Posterize", 7, .6), ("Posterize", 6, .6)),
    (("Equalize", 7, .4), ("Solarize", 4, .2)), (("Equalize", 4, .4), ("Rotate", 8, .8)),
    (("Solarize", 3, .6), ("Equalize", 7, .6)), (("Posterize", 5, .8), ("Equalize", 2, 1.)),
    (("Rotate", 3, .2), ("Solarize", 8, .6)), (("Equalize", 8, .6), ("Posterize", 6, .4)),
    (("Rotate", 8, .8), ("Color", 0, .4)), (("Rotate", 9, .4), ("Equalize", 2, .6)),
    (("Equalize", 7, 0.), ("Equalize", 8, .8)), (("Invert", 4, .6), ("Equalize", 8, 1.)),
    (("Color", 4, .6), ("Contrast", 8, 1.)), (("Rotate", 8, .8), ("Color", 2, 1.)),
    (("Color", 8, .8), ("Solarize", 7, .8)), (("Sharpness", 7, .4), ("Invert", 8, .6)),
    (("ShearX", 5, .6), ("Equalize", 9, 1.)), (("Color", 0, .4), ("Equalize", 3, .6)),
    (("Equalize", 7, .4), ("Solarize", 4, .2)), (("Solarize", 5, .6), ("AutoContrast", 5, .6)),
    (("Invert", 4, .6), ("Equalize", 8, 1.)), (("Color", 4, .6), ("Contrast", 8, 1.)),
]


def apply_op(img: Any, name: str, level: int, fill: Tuple[int, int, int] = MIDDLE_GRAY) -> Any:
    """One op at one level (signed ops draw their sign from python's ``random``)."""
    magnitudes, op = OPS[name]
    return op(img, magnitudes[level], fill)


class ImagenetAutoAugment:
    """ClassyVision's ``imagenet_autoaugment``: PIL image -> PIL image, drawing from python's ``random``."""

    def __init__(self, fill: Any = MIDDLE_GRAY, policy: Sequence[Any] = tuple(IMAGENET_POLICY)):
        self.fill = tuple(fill) if isinstance(fill, (list, tuple)) else (int(fill),) * 3
        self.policy: List[Any] = list(policy)

    def __call__(self, img: Any) -> Any:
        first, second = self.policy[random.randint(0, len(self.policy) - 1)]
        for name, level, prob in (first, second):
            if random.random() < prob:
                img = apply_op(img, name, level, self.fill)
        return img

    def __repr__(self) -> str:
        return "ImagenetAutoAugment(ClassyVision, %d sub-policies, fill %s)" % (len(self.policy), self.fill)

