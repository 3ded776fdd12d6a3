"""Training augmentations with each source's semantics, from the libraries its users use.

    data.auto_augment: "imagenet"   ClassyVision's ImageNet AutoAugment -> classy_autoaugment.py (exact)
    data.rand_augment: "rand-..."   timm's RandAugment string (mmpretrain's "timm_increasing" is
                                    "rand-m9-mstd0.5-inc1") -> timm.data.rand_augment_transform
    data.random_erasing: p          mmpretrain's RandomErasing (mode 'rand'), on the uint8 crop
    data.mixup / data.cutmix        timm.data.Mixup on the batch (timm, ClassyVision, mmpretrain)

Per-sample augmentations run in the loader workers on the uint8 crop, after RandomResizedCrop
and flip (the order of every source). Their randomness comes only from the per-sample
`random.Random` the loader seeds from (seed, epoch, reader, position). The libraries draw from
process-global generators; each policy seeds only the ones its library uses, from one draw of the
sample's rng, and restores them after: torchvision's AutoAugment draws from torch's (a few
microseconds to save and restore), timm's RandAugment picks its ops with numpy's global
`choice` (done here with a private generator seeded the same way: saving numpy's global state
costs ~110 us) and draws magnitudes from python's. The draws are the library's under
`seeded_global_rngs(seed)`, so a resumed run draws the same augmentations and the caller's
global RNG state is left as it was.

torchvision and timm are imported only when a recipe asks for them (`pip install
'vit-accel[timm]'`); the IPU host (Python 3.8, torch 2.0.1) imports this module without them.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from .fastpath import chw_to_pil, pil_into_chw
from .reader import DataError
from .settings import check_auto_augment, parse_rand_augment

# mmpretrain's RandomErasing in its imagenet_bs64_swin_224 pipeline (the only source row that erases)
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_ASPECT = (0.3, 1.0 / 0.3)
CLASSYVISION_FILL = 128  # ClassyVision's ImagenetAutoAugment fills with middle gray
INSTALL_HINT = "pip install 'vit-accel[timm]'"


def _import(module: str, key: str, value: Any) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise DataError("%s=%r uses %s, which is not installed here (%s): %s"
                        % (key, value, module.split(".")[0], e, INSTALL_HINT)) from None


# ----------------------------------------------------------------------------- randomness

@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed python's, numpy's and torch's CPU global generators from `seed`; restore them after."""
    py, npy, tch = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.default_generator.set_state(tch)


# ----------------------------------------------------------------------------- per sample

def random_erase(arr: np.ndarray, rng: random.Random, prob: float, fill_mean: Sequence[float],
                 fill_std: Sequence[float], area: Sequence[float] = ERASE_AREA,
                 aspect: Sequence[float] = ERASE_ASPECT) -> np.ndarray:
    """mmpretrain's RandomErasing(mode='rand', fill_color=mean, fill_std=std) on a uint8 HWC array.

    With probability `prob`, one rectangle of area uniform in `area` x image area, log-uniform
    aspect (h/w) in `aspect`, sides rounded and clamped to the image, top-left uniform over
    the positions that fit (the last row/column excluded, as numpy's randint draws), filled with
    per-pixel N(mean, std) truncated toward zero and clipped to 0..255. One try, no retries.
    Draws: the switch, the aspect, the area, top, left from `rng`, then the fill (float64
    normals, scaled) from a numpy generator seeded by `rng`. Returns `arr` itself when nothing is
    erased, else a copy.
    """
    box = _erase_box(arr.shape[0], arr.shape[1], rng, prob, area, aspect)
    if box is None:
        return arr
    top, left, h, w = box
    out = np.array(arr, copy=True)
    out[top:top + h, left:left + w] = _erase_fill(h, w, arr.shape[2], rng, fill_mean, fill_std)
    return out


def random_erase_chw(arr: np.ndarray, rng: random.Random, prob: float, fill_mean: Sequence[float],
                     fill_std: Sequence[float]) -> None:
    """`random_erase` in place on a uint8 [C, H, W] array: the same draws, the same pixels."""
    box = _erase_box(arr.shape[1], arr.shape[2], rng, prob, ERASE_AREA, ERASE_ASPECT)
    if box is not None:
        top, left, h, w = box
        arr[:, top:top + h, left:left + w] = _erase_fill(h, w, arr.shape[0], rng, fill_mean, fill_std).transpose(2, 0, 1)


def _erase_box(img_h: int, img_w: int, rng: random.Random, prob: float, area: Sequence[float],
               aspect: Sequence[float]) -> Optional[Tuple[int, int, int, int]]:
    """(top, left, h, w) of the rectangle to erase, or None (mmpretrain disables when rand() > prob)."""
    if rng.random() >= prob:
        return None
    aspect_ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    target = img_h * img_w * rng.uniform(area[0], area[1])
    h = min(int(round(math.sqrt(target * aspect_ratio))), img_h)
    w = min(int(round(math.sqrt(target / aspect_ratio))), img_w)
    top = rng.randrange(0, img_h - h) if img_h > h else 0
    left = rng.randrange(0, img_w - w) if img_w > w else 0
    return top, left, h, w


def _erase_fill(h: int, w: int, channels: int, rng: random.Random, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
    """uint8 [h, w, channels]: N(mean, std) per pixel, truncated toward zero, clipped to 0..255."""
    # float64 normals, as mmpretrain's np.random.normal: the same generator state gives the same pixels
    noise = np.random.default_rng(rng.getrandbits(64)).normal(mean, std, (h, w, channels))
    return np.clip(noise.astype(np.int32), 0, 255).astype(np.uint8)


class SampleAugment:
    """The per-sample augmentations of a recipe: crop (PIL or uint8 HWC) + per-sample rng -> uint8 HWC.

    Built from plain values so a spawned worker can build its own; building imports the library
    (so a missing one fails in the main process, before any worker starts).
    """

    def __init__(self, auto_augment: str = "", rand_augment: str = "", random_erasing: float = 0.0,
                 mean: Sequence[float] = (127.5, 127.5, 127.5), std: Sequence[float] = (127.5, 127.5, 127.5),
                 interpolation: str = "bilinear", img_size: int = 224):
        check_auto_augment(auto_augment)
        self.random_erasing, self.mean, self.std = float(random_erasing), list(mean), list(std)
        self.policy = None  # type: Any  # the library's transform
        self._apply = None  # type: Any  # (image, seed) -> image: the policy under its library's seeded RNGs
        if auto_augment:
            self.policy = imagenet_auto_augment()
            self._apply = _python_seeded(self.policy)
        elif rand_augment:
            self.policy = timm_rand_augment(rand_augment, mean, interpolation, img_size)
            self._apply = _TimmRandAugment(self.policy)

    @property
    def enabled(self) -> bool:
        return self.policy is not None or self.random_erasing > 0

    def __call__(self, img: Any, rng: random.Random) -> np.ndarray:
        if self._apply is not None:
            from PIL import Image

            img = self._apply(img if isinstance(img, Image.Image) else Image.fromarray(img), rng.getrandbits(63))
        arr = np.asarray(img)
        if self.random_erasing > 0:
            arr = random_erase(arr, rng, self.random_erasing, self.mean, self.std)
        return arr

    def into(self, crop: torch.Tensor, rng: random.Random, out: torch.Tensor) -> None:
        """`__call__` from a uint8 [3, H, W] tensor into `out` (uint8 [3, H, W]): the same draws and
        pixels, with the channel planes handed to PIL and back without interleaving copies."""
        if self._apply is not None:
            pil_into_chw(self._apply(chw_to_pil(crop), rng.getrandbits(63)), out)
        else:
            out.copy_(crop)
        if self.random_erasing > 0:
            random_erase_chw(out.numpy(), rng, self.random_erasing, self.mean, self.std)


def _python_seeded(transform: Any) -> Any:
    """transform(img, seed): `transform` drawing from python's global generator seeded with `seed`
    (ClassyVision's AutoAugment draws only from it), restored after."""

    def apply(img: Any, seed: int) -> Any:
        state = random.getstate()
        random.seed(seed)
        try:
            return transform(img)
        finally:
            random.setstate(state)

    return apply


class _TimmRandAugment:
    """timm's RandAugment.__call__ with its op choice drawn from a private numpy generator seeded as
    `seeded_global_rngs` seeds numpy's global one (same draws), and its ops (timm's AugmentOp
    objects, which draw from python's global generator) under python's seeded generator."""

    def __init__(self, ra: Any):
        self.ra, self.choice_rng = ra, np.random.RandomState(0)

    def __call__(self, img: Any, seed: int) -> Any:
        ra = self.ra
        self.choice_rng.seed(seed % (2 ** 32))
        ops = self.choice_rng.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
        state = random.getstate()
        random.seed(seed)
        try:
            for op in ops:
                img = op(img)
        finally:
            random.setstate(state)
        return img


def imagenet_auto_augment() -> Any:
    """ClassyVision's ImageNet AutoAugment, reproduced in classy_autoaugment.py (draws: python's global RNG)."""
    from .classy_autoaugment import ImagenetAutoAugment
    return ImagenetAutoAugment(CLASSYVISION_FILL)


def timm_rand_augment(spec: str, mean: Sequence[float], interpolation: str = "bilinear", img_size: int = 224) -> Any:
    """timm's RandAugment with the hparams timm's create_transform (and mmpretrain's config) give it:
    fill = the rounded normalization mean (0..255), the recipe's interpolation, translate 45%."""
    parse_rand_augment(spec)
    aa = _import("timm.data.auto_augment", "data.rand_augment", spec)
    from PIL import Image

    hparams = dict(translate_const=int(img_size * 0.45), translate_pct=0.45,
                   img_mean=tuple(min(255, int(round(m))) for m in mean),
                   interpolation={"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation])
    ra = aa.rand_augment_transform(spec, hparams)
    for op in ra.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_keeping_zero_bits(op.aug_fn)
    return ra


def posterize_keeping_zero_bits(posterize: Any) -> Any:
    """timm's posterize, except that keeping 0 bits gives a black image as mmcv and older Pillow do:
    recent Pillow (13.0) refuses bits=0, which timm's increasing posterize reaches at magnitude 10."""

    def op(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
        if bits_to_keep <= 0:
            from PIL import Image

            return Image.new(img.mode, img.size)
        return posterize(img, bits_to_keep, **kwargs)

    return op


# ----------------------------------------------------------------------------- per batch

class BatchMix:
    """timm's Mixup in 'batch' mode: one draw per batch, the batch reversed as partner.

    With probability `prob` the batch is mixed; then cutmix with probability `switch_prob` when
    both alphas are on (else the one that is); lambda ~ Beta(alpha, alpha), cutmix's corrected to
    the pasted area. Targets: one-hot smoothed by `smoothing`, mixed with the same lambda.
    `__call__(images, labels, seed)`: timm draws from numpy's global generator, seeded here
    from `seed` (the trainer's per-step seed), so a resumed run mixes the same way.
    """

    def __init__(self, num_classes: int, mixup: float, cutmix: float, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.0, batch_size: Optional[int] = None):
        if batch_size is not None and batch_size % 2:
            raise DataError("mixup/cutmix (data.mixup=%g, data.cutmix=%g) pair each image with the reversed batch "
                            "and need an even batch per call; got %d" % (mixup, cutmix, batch_size))
        mixup_mod = _import("timm.data.mixup", "data.mixup/cutmix", (mixup, cutmix))
        self.mixer = mixup_mod.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob,
                                     mode="batch", correct_lam=True, label_smoothing=smoothing,
                                     num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 or float [B, C, H, W] + int labels [B] -> float32 images, float32 targets [B, classes]."""
        if images.shape[0] % 2:
            raise DataError("mixup/cutmix need an even batch, got %d images" % images.shape[0])
        x = images.to(torch.float32, copy=True)  # timm mixes in place: never the caller's tensor
        with seeded_global_rngs(seed):
            return self.mixer(x, labels)
