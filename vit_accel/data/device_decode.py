"""`data.decode: gpu`: JPEG decode, crop, resize and flip on the device, for hosts short of cores.

The loader workers only parse headers and draw boxes (`batches.EncodedBatch`); here, in the
training process, one call decodes the whole batch with torchvision's batched decoder
(`torchvision.io.decode_jpeg(list, device="cuda")`, nvJPEG), then each image is cut to its
box, resized to S x S (antialiased bilinear/bicubic, as the CPU path; computed in float32 and
rounded, since the device kernels take no uint8) and flipped, into one uint8 [B, 3, S, S]
batch on the device. Samples the workers decoded themselves are copied into their slots.

A JPEG the device decoder refuses is decoded again alone, then by the CPU path with the same
box; one nothing decodes is counted as bad, named, and its slot takes another sample of the
batch (image and label), as a reader tops up its last batch. `device="cpu"` runs the same code
with torchvision's CPU decoder standing in for nvJPEG (what the tests without a GPU do).
Python 3.8 / torch 2.0 compatible; needs torchvision.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .batches import EncodedImages
from .fastpath import decode_for_crop, torchvision_jpeg_ops
from .reader import DataError
from .transforms import DecodeError


def _torchvision_decode_jpeg() -> Callable[..., Any]:
    """(list of uint8 byte tensors, device) -> list of uint8 [3, H, W] on the device."""
    ops = torchvision_jpeg_ops()
    if ops is None:
        raise DataError("data.decode=gpu decodes with torchvision's JPEG decoder, and torchvision is not importable "
                        "here: pip install torchvision, or set data.decode=cpu")
    cpu, cuda = ops

    def decode(data: Any, device: str) -> Any:
        items = data if isinstance(data, list) else [data]
        out = cuda(items, device) if torch.device(device).type == "cuda" else [cpu(d) for d in items]
        return list(out) if isinstance(data, list) else out[0]

    return decode


class DeviceDecoder:
    """EncodedImages (+ labels, keys) -> (uint8 [B, 3, S, S] on `device`, labels, bad samples)."""

    def __init__(self, device: str = "cuda", decode: Optional[Callable[..., Any]] = None):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise DataError("data.decode=gpu needs a CUDA device, and torch.cuda.is_available() is False here: "
                            "set data.decode=cpu")
        self.device = torch.device(device)
        self.decode = decode or _torchvision_decode_jpeg()

    def __call__(self, batch: EncodedImages, labels: torch.Tensor,
                 keys: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]:
        B, _, S, _ = batch.shape
        out = torch.empty((B, 3, S, S), dtype=torch.uint8, device=self.device)
        host = set(int(i) for i in batch.host_index)
        if host:
            out[batch.host_index.to(self.device)] = batch.host_images.to(self.device, non_blocking=True)
        todo = [i for i in range(B) if i not in host]
        pixels = self._decode_all([batch.jpeg(i) for i in todo])
        bad = []  # type: List[Tuple[int, str]]
        for i, img in zip(todo, pixels):
            box = tuple(int(v) for v in batch.boxes[i])
            if img is None:  # the device refused it: the CPU path, same box
                try:
                    img = decode_for_crop(bytes(batch.jpeg(i).numpy()), (0, 0), (0, 0), "pil").to(self.device)
                except DecodeError as e:
                    bad.append((i, "decode on %s and on the CPU failed: %s" % (self.device, e)))
                    continue
            crop = _resize_on_device(img, box, S, batch.interpolation)
            out[i] = crop.flip(-1) if bool(batch.flips[i]) else crop
        if bad:
            labels = labels.clone()
            good = sorted(set(range(B)) - {i for i, _ in bad})
            if not good:
                raise DataError("no sample of a batch decoded: %s" % "; ".join("%s: %s" % (keys[i], r) for i, r in bad))
            for n, (i, _) in enumerate(bad):
                j = good[n % len(good)]
                out[i], labels[i] = out[j], labels[j]
        return out, labels, [(str(keys[i]), reason) for i, reason in bad]

    def _decode_all(self, data: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """One batched decode; when it fails, each alone (None for the ones that fail)."""
        if not data:
            return []
        try:
            return list(self.decode(data, str(self.device)))
        except RuntimeError:
            out = []  # type: List[Optional[torch.Tensor]]
            for d in data:
                try:
                    out.append(self.decode(d, str(self.device)))
                except RuntimeError:
                    out.append(None)
            return out


def _resize_on_device(img: torch.Tensor, box: Tuple[int, int, int, int], img_size: int,
                      interpolation: str) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, S, S]: the box, antialiased resize in float32, rounded."""
    left, top, w, h = box
    crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
    if (h, w) != (img_size, img_size):
        crop = F.interpolate(crop, size=(img_size, img_size), mode=interpolation, antialias=True, align_corners=False)
    return crop[0].round_().clamp_(0, 255).to(torch.uint8)
