"""What a training reader fills per sample, and what it hands over per batch.

`data.decode: cpu` (the default): `PixelBatch`, a uint8 [B, 3, S, S] tensor whose slots the
fast path (`fastpath.train_sample`) writes; inside a loader worker it is allocated in shared
memory, so the DataLoader passes a handle instead of copying 9.6 MB per batch of 64 at 224 px.

`data.decode: gpu`: `EncodedBatch`. The reader parses each JPEG's header and draws the crop box
and the flip exactly as the CPU path does (same rng, same order), and ships the bytes, the
boxes and the flips (`EncodedImages`, three tensors and a byte blob); the main process decodes
and crops on the device (`device_decode.DeviceDecoder`). A sample the device will not get
(not a JPEG, or one whose data does not end at its EOI marker, as a truncated file does) is
decoded here by the CPU path with the same box; a failure there skips the sample like any bad
one. Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .fastpath import jpeg_size, train_sample
from .reader import DataError
from .transforms import random_resized_crop_box


def shared_uint8(shape: Sequence[int], shared: bool) -> torch.Tensor:
    """An uninitialized uint8 tensor, allocated in shared memory when `shared` (a worker's batch)."""
    shape = tuple(int(s) for s in shape)
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    numel = 1
    for s in shape:
        numel *= s
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # pragma: no cover - a torch without it: allocate, then move (one copy)
        return torch.empty(shape, dtype=torch.uint8).share_memory_()
    return torch.empty((0,), dtype=torch.uint8).set_(new_shared(max(numel, 1))).view(shape)


class PixelBatch:
    """B decoded, cropped, flipped (and augmented) images, written slot by slot (into `images` when given)."""

    def __init__(self, batch_size: int, img_size: int, shared: bool, images: Optional[torch.Tensor] = None):
        self.img_size = img_size
        self.images = shared_uint8((batch_size, 3, img_size, img_size), shared) if images is None else images

    def put(self, n: int, data: bytes, rng: random.Random, scale: Sequence[float], ratio: Sequence[float],
            interpolation: str, hflip: float, decoder: str, augment: Any) -> None:
        """Slot n <- one sample (DecodeError when the bytes are no complete image; the slot is then reused)."""
        train_sample(data, self.images[n], self.img_size, rng, scale, ratio, interpolation, hflip, decoder, augment)


class LoaderStopped(Exception):
    """In a worker waiting for a ring slot: the main process stopped reading (BatchRing.close)."""


class BatchRing:
    """Shared-memory slots that loader workers write their parts of pixel batches into, reused.

    A fresh shared segment per part costs its pages twice (zero-filled on the worker's first write,
    mapped again in the main process): about 20 ms of CPU per 224 px batch of 64, as much as a
    sixth of the decoding. The ring is allocated once per epoch's workers: reader r writes call c
    into slot c % slots once the main process has released that slot, and ships only keys and
    positions; the main process copies the slot out (pages already mapped) and releases it.
    With slots = prefetch_factor + 1 (what the loaders use) a reader waits only while the main
    process holds a part it already received, until the call's other parts arrive; no wait
    depends on that reader, so none can deadlock. The whole ring must fit in /dev/shm (a
    container's default is 64 MB): checked here, with what to do, before any worker starts.
    """

    def __init__(self, readers: int, slots: int, part_size: int, img_size: int):
        self.slots, self.owner = slots, os.getpid()  # the process that copies the parts out
        check_shared_memory(readers * slots * part_size * (3 * img_size * img_size + 8))
        self.images = shared_uint8((readers, slots, part_size, 3, img_size, img_size), True)
        self.labels = torch.zeros((readers, slots, part_size), dtype=torch.int64).share_memory_()
        self.busy = torch.zeros((readers, slots), dtype=torch.int32).share_memory_()
        self.closed = torch.zeros((1,), dtype=torch.int32).share_memory_()

    def claim(self, reader: int, call: int, poll: float = 0.001) -> int:
        """The slot reader `reader` writes call `call` into, once the main process has released it.
        A worker whose main process is gone (killed) stops waiting and exits; one whose main process
        stopped reading (`close`) stops waiting and returns to the DataLoader's loop, which ends it."""
        k, waited = call % self.slots, 0
        while int(self.busy[reader, k]):
            if int(self.closed[0]):
                raise LoaderStopped("the main process reads no more batches from this loader")
            time.sleep(poll)
            waited += 1
            if waited % 500 == 0 and not _alive(self.owner):
                raise SystemExit("vit-accel loader worker: the training process %d is gone" % self.owner)
        self.busy[reader, k] = 1
        return k

    def part(self, reader: int, slot: int, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[reader, slot, :n], self.labels[reader, slot, :n]

    def release(self, reader: int, slot: int) -> None:
        self.busy[reader, slot] = 0

    def close(self) -> None:
        """The main process reads no more of this ring."""
        self.closed[0] = 1


# The DataLoader iterators of the loaders' iterations that have not ended (stop_workers ends them).
_RUNNING: Dict[int, Any] = {}


def running_workers(loader_iter: Any) -> Any:
    """Hold `loader_iter` (a DataLoader iterator with workers) until stop_workers: a loader's iteration
    dropped inside a reference cycle (an exception's traceback, a frame that holds it) is freed by the
    garbage collector, which runs the finalizers of the iterator's queues (closing them) before any
    generator's `finally`; held here, the iterator and its queues stay alive until that `finally` has
    ended the workers."""
    _RUNNING[id(loader_iter)] = loader_iter
    return loader_iter


def stop_workers(loader_iter: Any, ring: Optional[BatchRing]) -> None:
    """End a DataLoader iterator's workers now, when the loader's iteration ends early (an error, a
    run that stops, an iterator dropped): the ring's waiting workers stop waiting, then the
    DataLoader's own shutdown (what its __del__ calls; idempotent) ends them. Left to __del__, an
    iterator that a reference cycle holds is freed by the garbage collector, which closes its index
    queues first: its workers never get the shutdown message and each costs the 5 s join timeout
    (10 s with 2 workers, on the next collection), then is terminated."""
    _RUNNING.pop(id(loader_iter), None)
    if ring is not None:
        ring.close()
    shutdown = getattr(loader_iter, "_shutdown_workers", None)  # the multi-process iterator's; torch >= 1.x
    if shutdown is not None:
        shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - exists, another user's (the pid was reused)
        return True
    return True


def check_shared_memory(need: int, folder: str = "/dev/shm") -> None:
    """DataError when `folder` (where torch's shared memory lives on Linux) has less than `need` bytes
    free: workers would otherwise die of SIGBUS on their first write."""
    try:
        st = os.statvfs(folder)
    except OSError:  # no such folder (not Linux): nothing to check
        return
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise DataError("the loader's shared-memory batches need %d MB and %s has %d MB free: give the "
                        "container more (docker run --shm-size=2g, or a larger /dev/shm), or lower "
                        "data.workers or the batch size" % (-(-need // 2 ** 20), folder, free // 2 ** 20))


class EncodedImages:
    """A batch as the device decoder takes it: JPEG bytes, crop boxes, flips, and host-decoded images.

    blob: uint8 [total bytes]; offsets: int64 [B + 1] (sample i is blob[offsets[i]:offsets[i + 1]],
    empty for a host sample); boxes: int64 [B, 4] (left, top, width, height on the full image);
    flips: bool [B]; host_index: int64 [k] and host_images: uint8 [k, 3, S, S], the samples decoded here.
    """

    def __init__(self, blob: torch.Tensor, offsets: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                 host_index: torch.Tensor, host_images: torch.Tensor, img_size: int, interpolation: str):
        self.blob, self.offsets, self.boxes, self.flips = blob, offsets, boxes, flips
        self.host_index, self.host_images = host_index, host_images
        self.img_size, self.interpolation = img_size, interpolation

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (int(self.boxes.shape[0]), 3, self.img_size, self.img_size)

    def jpeg(self, i: int) -> torch.Tensor:
        return self.blob[int(self.offsets[i]):int(self.offsets[i + 1])]


def ends_at_eoi(data: bytes) -> bool:
    """Whether a JPEG's data ends with its EOI marker (a truncated file does not)."""
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


class EncodedBatch:
    """B samples for the device: the bytes, each with its box and flip drawn here."""

    def __init__(self, batch_size: int, img_size: int, interpolation: str):
        self.size, self.img_size, self.interpolation = batch_size, img_size, interpolation
        self.data = [b""] * batch_size  # type: List[bytes]
        self.boxes = [(0, 0, 0, 0)] * batch_size  # type: List[Tuple[int, int, int, int]]
        self.flips = [False] * batch_size
        self.host = {}  # type: dict

    def put(self, n: int, data: bytes, rng: random.Random, scale: Sequence[float], ratio: Sequence[float],
            interpolation: str, hflip: float, decoder: str, augment: Any) -> None:
        size = jpeg_size(data)
        if size is None or not ends_at_eoi(data):
            out = torch.empty((3, self.img_size, self.img_size), dtype=torch.uint8)
            train_sample(data, out, self.img_size, rng, scale, ratio, interpolation, hflip, decoder, None)
            self.host[n], self.data[n] = out, b""
            return
        self.host.pop(n, None)
        self.boxes[n] = random_resized_crop_box(size[0], size[1], scale, ratio, rng)
        self.flips[n] = rng.random() < hflip
        self.data[n] = data

    @property
    def images(self) -> EncodedImages:
        lengths = [len(d) for d in self.data]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        blob = torch.frombuffer(bytearray(b"".join(self.data)), dtype=torch.uint8) if offsets[-1] else \
            torch.empty((0,), dtype=torch.uint8)
        index = sorted(self.host)
        host = torch.stack([self.host[i] for i in index]) if index else \
            torch.empty((0, 3, self.img_size, self.img_size), dtype=torch.uint8)
        return EncodedImages(blob, torch.tensor(offsets, dtype=torch.int64),
                             torch.tensor(self.boxes, dtype=torch.int64).view(-1, 4),
                             torch.tensor(self.flips, dtype=torch.bool), torch.tensor(index, dtype=torch.int64),
                             host, self.img_size, self.interpolation)


def new_train_batch(o: Any, batch_size: int, in_worker: bool) -> Any:
    """The batch a training reader fills for the loader options `o` (data.decode cpu or gpu)."""
    if getattr(o, "decode", "cpu") == "gpu":
        return EncodedBatch(batch_size, o.img_size, o.interpolation)
    return PixelBatch(batch_size, o.img_size, in_worker)
