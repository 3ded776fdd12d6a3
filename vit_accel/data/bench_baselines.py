"""The loaders `vit-accel bench-data` measures ours against: torchvision's and timm's own objects.

Each baseline is what a user of that library writes, built from the library's classes (no
re-implementation): a dataset over the ImageFolder, the library's transform, and torch's
DataLoader with the same workers and batch as ours (shuffled, last short batch dropped).

    torchvision        ImageFolder + v2.Compose([RandomResizedCrop(S, antialias=True),
                       RandomHorizontalFlip(), ToImage(), ToDtype(uint8)])
    timm               timm.data.ImageDataset + create_transform(S, is_training=True,
                       normalize=False): timm's default training recipe (RandomResizedCrop,
                       flip, ColorJitter 0.4) with uint8 out, i.e. minus the normalization
    timm-rand-augment  ImageDataset + create_transform(S, is_training=True, auto_augment=
                       "rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
                       re_mode="pixel"): timm's RandAugment + random erasing (timm erases the
                       normalized float tensor, so this one normalizes: float32 out; its
                       posterize gets the fix ours has for Pillow 13, which refuses 0 bits)
    torchvision-auto-augment  ImageFolder + v2 RandomResizedCrop + flip + AutoAugment(IMAGENET)
                       + ToImage (uint8)
    torchvision-eval   ImageFolder + v2.Compose([Resize(resize, antialias=True), CenterCrop(S),
                       ToImage(), ToDtype(uint8)]), not shuffled

Python 3.8 compatible; needs torchvision (and timm for the timm rows).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch.utils.data import DataLoader

from .augment import posterize_keeping_zero_bits
from .reader import DataError

BASELINES = {
    "torchvision": "torchvision ImageFolder + transforms.v2 RandomResizedCrop(antialias) + flip + ToImage (uint8)",
    "timm": "timm ImageDataset + create_transform(is_training=True, normalize=False) (crop, flip, color jitter 0.4; "
            "uint8)",
    "timm-rand-augment": "timm ImageDataset + create_transform(is_training=True, auto_augment=rand-m9-mstd0.5-inc1, "
                         "bicubic, re_prob=0.25, re_mode=pixel) (float32, normalized)",
    "torchvision-auto-augment": "torchvision ImageFolder + transforms.v2 RandomResizedCrop + flip + "
                                "AutoAugment(IMAGENET) + ToImage (uint8)",
    "torchvision-eval": "torchvision ImageFolder + transforms.v2 Resize(antialias) + CenterCrop + ToImage (uint8)",
}


def _v2() -> Any:
    try:
        from torchvision.transforms import v2
    except ImportError as e:
        raise DataError("bench-data measures against torchvision's own pipeline, and torchvision is not importable "
                        "here (%s): pip install 'vit-accel[timm]'" % e) from None
    return v2


def _timm_data() -> Any:
    try:
        import timm.data
    except ImportError as e:
        raise DataError("the timm baselines need timm, which is not importable here (%s): pip install "
                        "'vit-accel[timm]', or leave out the timm pipelines" % e) from None
    return timm.data


def baseline_transform(name: str, img_size: int, resize: int = 0) -> Any:
    """The library transform of baseline `name` (see BASELINES)."""
    v2 = _v2()
    uint8 = [v2.ToImage(), v2.ToDtype(torch.uint8)]
    if name == "torchvision":
        return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip()] + uint8)
    if name == "torchvision-auto-augment":
        return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip(),
                           v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)] + uint8)
    if name == "torchvision-eval":
        return v2.Compose([v2.Resize(resize or img_size, antialias=True), v2.CenterCrop(img_size)] + uint8)
    timm_data = _timm_data()
    if name == "timm":
        return timm_data.create_transform(img_size, is_training=True, normalize=False)
    if name == "timm-rand-augment":
        tf = timm_data.create_transform(img_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                        interpolation="bicubic", re_prob=0.25, re_mode="pixel")
        for t in tf.transforms:  # timm's posterize raises at magnitude 10 under Pillow 13: the op ours runs
            for op in getattr(t, "ops", []):
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_keeping_zero_bits(op.aug_fn)
        return tf
    raise ValueError("no baseline %r; known: %s" % (name, ", ".join(BASELINES)))


def baseline_loader(name: str, root: str, img_size: int, batch_size: int, workers: int, resize: int = 0) -> DataLoader:
    """The library's dataset over the ImageFolder `root` with baseline `name`'s transform, in a DataLoader."""
    transform = baseline_transform(name, img_size, resize)
    if name.startswith("timm"):
        dataset = _timm_data().ImageDataset(root, transform=transform)  # type: Any
    else:
        import torchvision

        dataset = torchvision.datasets.ImageFolder(root, transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=not name.endswith("eval"), num_workers=workers,
                      drop_last=True)


def describe(names: Dict[str, Tuple[str, str]]) -> str:
    """Lines 'pipeline: ours vs baseline' for the legend under bench-data's table."""
    return "\n".join("  %-14s %s\n  %-14s vs %s" % (p, ours, "", BASELINES[base]) for p, (ours, base) in names.items())
