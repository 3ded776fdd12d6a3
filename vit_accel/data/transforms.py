"""Image decode and transforms without torchvision: PIL (or simplejpeg) on the host, uint8 out.

The host side turns encoded bytes into a uint8 HWC array of the final size (with the recipe's
per-sample augmentations, `augment.SampleAugment`); normalization runs on the device
(`normalize`), so the host ships 1 byte per pixel instead of 4 and the device does the arithmetic.

Random crops are drawn from a `random.Random` the caller seeds per sample (from seed, epoch,
reader and sample index), so a resumed run draws exactly the crops an uninterrupted run
would. The crop is chosen on the full-size image and then applied to a possibly reduced
decode (JPEG DCT scaling: PIL's draft mode or simplejpeg's min_width/min_height), which
only ever keeps at least the resolution the output needs.

Python 3.8 / torch 2.0 compatible (the IPU backend imports this module).
"""
from __future__ import annotations

import io
import math
import random
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

try:  # optional fast JPEG decoder (libjpeg-turbo); PIL is the fallback everywhere
    import simplejpeg as _simplejpeg  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class DecodeError(Exception):
    """The bytes are not a decodable image (truncated, wrong format, empty)."""


def resample_filter(name: str) -> int:
    """PIL resampling constant for "bilinear" / "bicubic"."""
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise ValueError("data.interpolation must be one of %s, got %r" % (sorted(_RESAMPLE), name)) from None


DECODERS = ("auto", "libjpeg", "torchvision", "simplejpeg", "pil")


def resolve_decoder(name: str) -> str:
    """"auto" -> "libjpeg" where the partial decoder builds here (`jpeg_region`), else "torchvision"
    when importable, else "simplejpeg" when importable, else "pil".

    The decoder of full-size JPEGs in the fast path (`fastpath.train_sample`, `eval_sample`):
    "libjpeg" decodes only a training crop's rows and iMCU columns (evaluation: the pixels its
    center crop's resize reads) and, like "torchvision", decodes whole images with torchvision's
    decoder; reduced (DCT-scaled) decodes and PNGs go through PIL (or simplejpeg when named).
    """
    if name in ("auto", "libjpeg"):
        from . import jpeg_region

        why = jpeg_region.unavailable()
        if not why and _importable("torchvision.io"):
            return "libjpeg"
        if name == "libjpeg":
            raise ValueError("data.decoder=libjpeg cannot work here: %s; use data.decoder=auto"
                             % (why or "torchvision is not installed (pip install torchvision)"))
    if name == "auto":
        if _importable("torchvision.io"):
            return "torchvision"
        return "simplejpeg" if _simplejpeg is not None else "pil"
    if name == "simplejpeg" and _simplejpeg is None:
        raise ValueError("data.decoder=simplejpeg but simplejpeg is not installed (pip install simplejpeg), "
                         "or use data.decoder=auto")
    if name == "torchvision" and not _importable("torchvision.io"):
        raise ValueError("data.decoder=torchvision but torchvision is not installed (pip install torchvision), "
                         "or use data.decoder=auto")
    if name not in DECODERS:
        raise ValueError("data.decoder must be one of %s, got %r" % (", ".join(DECODERS), name))
    return name


def describe_decoder(resolved: str) -> str:
    """How JPEGs decode under a resolved data.decoder, and why not partially where it could not."""
    if resolved == "libjpeg":
        return "libjpeg, only each crop's rows and columns"
    from . import jpeg_region

    why = jpeg_region.unavailable()
    return resolved + (" (whole images; the partial decoder: %s)" % why if why else "")


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except (ImportError, RuntimeError):  # RuntimeError: a torchvision built for another torch
        return False


# ----------------------------------------------------------------------------- geometry

def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                            rng: random.Random) -> Tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering `scale` of the area with aspect in `ratio`.

    Ten tries at a random area/aspect that fits, then a center crop with the aspect clamped
    into `ratio` (the standard RandomResizedCrop rule, so recipes transfer).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter_size(width: int, height: int, shorter: int) -> Tuple[int, int]:
    """Output (w, h) when the shorter side becomes `shorter` (aspect kept, long side truncated)."""
    if width <= height:
        return shorter, max(1, int(shorter * height / width))
    return max(1, int(shorter * width / height)), shorter


def center_crop_box(width: int, height: int, size: int) -> Tuple[int, int, int, int]:
    """(left, top, w, h) of the centered size x size window (clamped to the image)."""
    w, h = min(size, width), min(size, height)
    return int(round((width - w) / 2.0)), int(round((height - h) / 2.0)), w, h


# ----------------------------------------------------------------------------- decode

def open_image(data: bytes) -> Image.Image:
    """Parse the header only (no pixel decode); DecodeError when the bytes are no image."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
        raise DecodeError("%s: %s" % (type(e).__name__, e)) from None


def load_rgb(img: Image.Image, data: bytes, decoder: str = "pil", need: Tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Decode an `open_image` result to RGB; `need` is the least (w, h) the caller samples from.

    JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the result stays at least `need` (PIL
    draft mode or simplejpeg's min size): the cheapest pixels are the ones never decoded.
    Raises DecodeError for anything that is not a complete image (truncated, corrupt).
    """
    need_w, need_h = int(math.ceil(need[0])), int(math.ceil(need[1]))
    try:
        if decoder == "simplejpeg" and img.format == "JPEG":
            arr = _simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=max(need_w, 1),
                                          min_height=max(need_h, 1))
            return Image.fromarray(arr)
        if img.format == "JPEG" and need_w > 0 and need_h > 0 and img.width >= 2 * need_w \
                and img.height >= 2 * need_h:
            img.draft("RGB", (need_w, need_h))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:  # truncated data surfaces here, at load time, as OSError/ValueError/...
        raise DecodeError("%s: %s" % (type(e).__name__, e)) from None


def decode_image(data: bytes, decoder: str = "pil") -> Image.Image:
    """Encoded bytes -> full-size RGB PIL image (DecodeError when not a complete image)."""
    return load_rgb(open_image(data), data, decoder)


# ----------------------------------------------------------------------------- per-sample transforms

def train_transform(data: bytes, img_size: int, rng: random.Random, scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (0.75, 4.0 / 3.0), interpolation: str = "bilinear",
                    hflip: float = 0.5, decoder: str = "pil",
                    augment: Optional[Callable[[Any, random.Random], np.ndarray]] = None) -> np.ndarray:
    """Encoded bytes -> uint8 (img_size, img_size, 3): RandomResizedCrop + horizontal flip [+ augment].

    The crop and flip draws come from `rng` before any pixel work, in a fixed order (crop,
    flip); `augment(crop, rng)` (a `SampleAugment`) then draws from the same rng, so the result
    depends only on the bytes and the rng seed.
    """
    img = open_image(data)
    width, height = img.size
    left, top, w, h = random_resized_crop_box(width, height, scale, ratio, rng)
    flip = rng.random() < hflip
    # The crop is resampled to img_size, so a decode reduced until the crop is ~img_size loses nothing.
    img = load_rgb(img, data, decoder, (img_size * width / w, img_size * height / h))
    sx, sy = img.width / width, img.height / height
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    img = img.resize((img_size, img_size), resample_filter(interpolation), box=box)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return augment(img, rng) if augment is not None else np.asarray(img)


def eval_resize_size(img_size: int, resize: int = 0, crop_fraction: float = 0.0) -> int:
    """The shorter side before the center crop: ``resize``, or timm's ``floor(img_size / crop_pct)``."""
    if crop_fraction:
        return int(math.floor(img_size / crop_fraction))
    return resize or img_size


def eval_transform(data: bytes, img_size: int, resize: int = 0, interpolation: str = "bilinear",
                   decoder: str = "pil") -> np.ndarray:
    """Encoded bytes -> uint8 (img_size, img_size, 3): shorter side to `resize` (0: img_size), center crop.

    PIL throughout (timm's and torchvision's PIL eval transform to the value); the loader's
    `fastpath.eval_sample` computes the same with torch's resize, and falls back to this.
    """
    resize = resize or img_size
    img = open_image(data)
    out_w, out_h = resize_shorter_size(img.width, img.height, resize)
    img = load_rgb(img, data, decoder, (out_w, out_h))
    img = img.resize((out_w, out_h), resample_filter(interpolation))
    left, top, w, h = center_crop_box(out_w, out_h, img_size)
    img = img.crop((left, top, left + w, top + h))
    if img.size != (img_size, img_size):  # the image was smaller than the crop: pad, never stretch
        canvas = Image.new("RGB", (img_size, img_size))
        canvas.paste(img, ((img_size - w) // 2, (img_size - h) // 2))
        img = canvas
    return np.asarray(img)


# ----------------------------------------------------------------------------- device-side ops

def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] (0..255) -> (x - mean) / std in `dtype`, on the images' device.

    The arithmetic runs in float32 and is cast once, so bf16/fp16 outputs carry one rounding.
    """
    if images.dim() != 4 or images.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError("normalize expects [B, C, H, W] with C == len(mean) == len(std); got %s, %d means, %d stds"
                         % (tuple(images.shape), len(mean), len(std)))
    m = torch.tensor(list(mean), dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    inv = 1.0 / torch.tensor(list(std), dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    out = (images.to(torch.float32) - m) * inv
    return out if dtype == torch.float32 else out.to(dtype)
