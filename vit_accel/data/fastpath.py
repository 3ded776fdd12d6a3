"""The per-sample fast path: encoded bytes straight into a uint8 [3, S, S] slot of the batch.

Where the time goes on a 500x375 JPEG (2-core EPYC, one thread): decoding ~0.85 ms, PIL's
crop + resize 0.9 ms (bilinear) to 1.3 ms (bicubic), and in a torchvision ImageFolder
pipeline as much again in Python, PIL-to-tensor copies and collation. Here:

- the size comes from the JPEG's frame header (`jpeg_size`, a few microseconds; PIL's
  `Image.open` parses every marker in Python);
- the crop box and the flip are drawn first (the same rng draws in the same order as
  `transforms.train_transform`), so the decoder knows what is needed;
- decode: at 1/2, 1/4 or 1/8 scale when the reduced image still holds the crop at the output
  resolution (PIL draft mode; the box then maps to the reduced image, each edge rounded to a
  decoded pixel); else, for a training crop, only the crop's rows and iMCU columns at full size
  (`jpeg_region`: libjpeg-turbo's partial decoding, the full decode's pixels; about 1/3 less
  decode time on 500x375 photos), and for evaluation the source pixels its center crop's resize
  reads; else the whole image with torchvision's libjpeg-turbo decoder
  straight into a uint8 tensor (the same pixels as PIL's, no RGBX-to-RGB copy) where torchvision
  is installed; PIL otherwise, and for PNG and anything the faster decoders refuse (the same box:
  never another crop);
- crop + resize in one step on the uint8 tensor, `F.interpolate(antialias=True)`: torchvision's
  own tensor `RandomResizedCrop` (`v2.functional.resized_crop`), 3x faster than PIL here;
- flip and the CHW layout come with the one copy into the batch slot, which lives in shared
  memory inside loader workers (`shared_uint8`), so handing the batch over copies nothing.

Torch builds without uint8 antialiased resizing (before 2.1) take the PIL path
(`transforms.train_transform`) with the same box. Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import functools
import math
import random
import struct
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import jpeg_region
from .transforms import (center_crop_box, eval_transform, load_rgb, open_image, random_resized_crop_box,
                         resample_filter, resize_shorter_size, train_transform)

# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); C4/C8/CC are not frames
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM carry no length field


def jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a JPEG's frame header, or None when `data` is no JPEG this can read."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _NO_LENGTH:
            i += 2
        elif marker in _SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return (width, height) if width and height else None
        else:
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


# ----------------------------------------------------------------------------- capabilities

_caps = {}  # type: dict


def torchvision_jpeg_ops() -> Optional[Tuple[Callable[..., torch.Tensor], Callable[..., Any]]]:
    """torchvision's registered JPEG decode ops, (cpu, cuda), or None where torchvision is missing.

    cpu(data: uint8 tensor) -> uint8 [3, H, W] (HWC memory), RGB; cuda(list of them, device) ->
    list on the device (nvJPEG, one batched call). The registered ops (`torch.ops.image.*`,
    what `torchvision.io.decode_jpeg` dispatches to) skip the wrapper's per-call usage logging
    and the deprecation warning it raises on every image since torchvision 0.29.
    """
    if "tv" not in _caps:
        _caps["tv"] = None
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            rgb = ImageReadMode.RGB.value
            ops = torch.ops.image
            if hasattr(ops, "decode_jpeg") and hasattr(ops, "decode_jpegs_cuda"):
                _caps["tv"] = (lambda t: ops.decode_jpeg(t, rgb, False),
                               lambda ts, device: ops.decode_jpegs_cuda(ts, rgb, torch.device(device)))
            else:  # pragma: no cover - a torchvision that registers other names: its public function
                _caps["tv"] = (lambda t: decode_jpeg(t, mode=ImageReadMode.RGB),
                               lambda ts, device: decode_jpeg(ts, mode=ImageReadMode.RGB, device=device))
        except (ImportError, RuntimeError, AttributeError):  # not installed, or built for another torch
            pass
    return _caps["tv"]


def _torchvision_decode() -> Optional[Callable[[bytes], torch.Tensor]]:
    ops = torchvision_jpeg_ops()
    if ops is None:
        return None
    cpu = ops[0]
    return lambda data: cpu(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def uint8_resize_supported() -> bool:
    """Whether this torch resizes uint8 images with antialiasing on the CPU (2.1 and later)."""
    if "aa" not in _caps:
        try:
            F.interpolate(torch.zeros((1, 3, 4, 4), dtype=torch.uint8), size=(2, 2), mode="bilinear",
                          antialias=True)
            _caps["aa"] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _caps["aa"] = False
    return _caps["aa"]


# ----------------------------------------------------------------------------- decode and resample

def _reducible(size: Tuple[int, int], need: Tuple[float, float]) -> bool:
    """Whether a 1/2-scale (or smaller) decode still holds `need` pixels: PIL's draft mode then."""
    return need[0] > 0 and size[0] >= 2 * math.ceil(need[0]) and size[1] >= 2 * math.ceil(need[1])


def decode_for_crop(data: bytes, size: Tuple[int, int], need: Tuple[float, float], decoder: str,
                    img: Any = None) -> torch.Tensor:
    """uint8 [3, h, w] (HWC memory) of the image at full size, or reduced while it stays >= `need`.

    `img` is an `open_image` result when the caller has one. A JPEG the fast decoder refuses is
    decoded by PIL; DecodeError when PIL cannot either (truncated, corrupt, no image).
    """
    reducible = _reducible(size, need)
    tv = _torchvision_decode() if decoder in ("libjpeg", "torchvision", "auto") else None
    if tv is not None and not reducible and img is None:
        try:
            return tv(data)
        except RuntimeError:  # a JPEG libjpeg-turbo refuses here: PIL gets the same bytes, the box is the same
            pass
    if img is None:
        img = open_image(data)
    pil = load_rgb(img, data, "simplejpeg" if decoder == "simplejpeg" else "pil", need if reducible else (0, 0))
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)


def resized_crop(pixels: torch.Tensor, box: Tuple[int, int, int, int], img_size: int,
                 interpolation: str) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, img_size, img_size]: the integer box (left, top, w, h), antialiased
    bilinear/bicubic resize (the computation of torchvision's tensor resized_crop)."""
    left, top, w, h = box
    crop = pixels[:, top:top + h, left:left + w].unsqueeze(0)
    if (h, w) == (img_size, img_size):
        return crop[0]
    return F.interpolate(crop, size=(img_size, img_size), mode=interpolation, antialias=True,
                         align_corners=False)[0]


def _scaled_box(box: Tuple[int, int, int, int], size: Tuple[int, int], decoded: torch.Tensor) -> Tuple[int, int, int, int]:
    """The box on a reduced decode: each edge rounded to the nearest decoded pixel (at least 1 wide)."""
    left, top, w, h = box
    sx, sy = decoded.shape[2] / size[0], decoded.shape[1] / size[1]
    x0, y0 = int(round(left * sx)), int(round(top * sy))
    x1, y1 = max(int(round((left + w) * sx)), x0 + 1), max(int(round((top + h) * sy)), y0 + 1)
    return x0, y0, min(x1, decoded.shape[2]) - x0, min(y1, decoded.shape[1]) - y0


# ----------------------------------------------------------------------------- per sample

def one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` on one intra-op thread: in the main process (workers=0) torch would split each
    image's small ops over every core and wait on cores that other work keeps busy."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


@one_thread
def train_sample(data: bytes, out: torch.Tensor, img_size: int, rng: random.Random,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (0.75, 4.0 / 3.0),
                 interpolation: str = "bilinear", hflip: float = 0.5, decoder: str = "auto",
                 augment: Any = None) -> None:
    """Encoded bytes -> `out` (uint8 [3, img_size, img_size]): RandomResizedCrop + flip [+ augment].

    The draws are `transforms.train_transform`'s (crop, then flip, then the augmentations':
    `augment.into(crop, rng, out)`, a `SampleAugment`).
    """
    if not uint8_resize_supported():
        _put_hwc(out, train_transform(data, img_size, rng, scale, ratio, interpolation, hflip,
                                      "pil" if decoder in ("libjpeg", "torchvision") else decoder, augment))
        return
    resample_filter(interpolation)
    size, img = jpeg_size(data), None
    if size is None:  # PNG, or a JPEG whose header this parser does not follow: PIL reads it
        img = open_image(data)
        size = img.size
    box = random_resized_crop_box(size[0], size[1], scale, ratio, rng)
    flip = rng.random() < hflip
    need = (img_size * size[0] / box[2], img_size * size[1] / box[3])
    region = None
    if decoder in ("libjpeg", "auto") and img is None and not _reducible(size, need):
        region = jpeg_region.decode_box(data, size, box)  # None: refused, decoded below the exact way
    if region is not None:
        pixels, box = region
    else:
        pixels = decode_for_crop(data, size, need, decoder, img)
        if pixels.shape[1:] != (size[1], size[0]):
            box = _scaled_box(box, size, pixels)
    crop = resized_crop(pixels, box, img_size, interpolation)
    if flip:
        crop = crop.flip(-1)
    if augment is None:
        out.copy_(crop)
    else:
        augment.into(crop.contiguous(), rng, out)


def chw_to_pil(chw: torch.Tensor) -> Any:
    """uint8 [3, H, W] (contiguous) -> RGB PIL image: the planes are wrapped, not copied, then merged."""
    from PIL import Image

    size = (chw.shape[2], chw.shape[1])
    arr = chw.numpy()
    return Image.merge("RGB", [Image.frombuffer("L", size, arr[i], "raw", "L", 0, 1) for i in range(3)])


def pil_into_chw(img: Any, out: torch.Tensor) -> None:
    """RGB PIL image -> `out` (uint8 [3, H, W]) plane by plane (no HWC array, no transposing copy)."""
    planes = out.numpy()
    for i, band in enumerate("RGB"):
        planes[i] = np.frombuffer(img.tobytes("raw", band), dtype=np.uint8).reshape(planes.shape[1:])


def _put_hwc(out: torch.Tensor, arr: np.ndarray) -> None:
    """uint8 [H, W, 3] array -> the [3, H, W] slot `out` (torch's permuted copy is the fast one)."""
    if not arr.flags.writeable:  # an array over a PIL image's bytes: torch wants memory it may own
        arr = arr.copy()
    out.copy_(torch.from_numpy(arr).permute(2, 0, 1))


def _source_span(start: int, stop: int, n: int, m: int, radius: int) -> Tuple[int, int]:
    """The input range [a, b) that outputs [start, stop) of an antialiased resize n -> m read: each
    output's filter reaches `radius` input pixels (bilinear 1, bicubic 2) times the downscale
    factor around its centre; two more pixels each side, clamped to [0, n)."""
    scale = n / m
    support = radius * max(scale, 1.0)
    a = int(math.floor(scale * (start + 0.5) - support)) - 2
    b = int(math.ceil(scale * (stop - 0.5) + support)) + 2
    return max(a, 0), min(b, n)


@one_thread
def eval_sample(data: bytes, out: torch.Tensor, img_size: int, resize: int = 0, interpolation: str = "bilinear",
                decoder: str = "auto") -> None:
    """Encoded bytes -> `out` (uint8 [3, img_size, img_size]): shorter side to `resize` (0: img_size),
    center crop; torchvision's tensor Resize(antialias=True) + CenterCrop on the train path's decode.

    Against the PIL computation (`transforms.eval_transform`, timm's eval transform) about 0.3% of
    the values differ, by one level (bicubic: by two in a few per million).
    """
    if not uint8_resize_supported():
        _put_hwc(out, eval_transform(data, img_size, resize, interpolation,
                                     "pil" if decoder in ("libjpeg", "torchvision") else decoder))
        return
    resize = resize or img_size
    size, img = jpeg_size(data), None
    if size is None:
        img = open_image(data)
        size = img.size
    out_w, out_h = resize_shorter_size(size[0], size[1], resize)
    left, top, w, h = center_crop_box(out_w, out_h, img_size)
    pixels = None
    if decoder in ("libjpeg", "auto") and img is None and not _reducible(size, (out_w, out_h)):
        # only the source pixels the center crop's outputs read; the resize still runs on the whole
        # canvas (its other outputs are discarded), so the kept ones are computed exactly as before
        radius = 1 if interpolation == "bilinear" else 2
        x0, x1 = _source_span(left, left + w, size[0], out_w, radius)
        y0, y1 = _source_span(top, top + h, size[1], out_h, radius)
        pixels = jpeg_region.decode_into_canvas(data, size, (x0, y0, x1 - x0, y1 - y0))
    if pixels is None:
        pixels = decode_for_crop(data, size, (out_w, out_h), decoder, img)
    if tuple(pixels.shape[1:]) != (out_h, out_w):
        pixels = F.interpolate(pixels.unsqueeze(0), size=(out_h, out_w), mode=interpolation, antialias=True,
                               align_corners=False)[0]
    window = pixels[:, top:top + h, left:left + w]
    if (h, w) == (img_size, img_size):
        out.copy_(window)
    else:  # the image was smaller than the crop: pad, never stretch
        out.zero_()
        y, x = (img_size - h) // 2, (img_size - w) // 2
        out[:, y:y + h, x:x + w] = window
