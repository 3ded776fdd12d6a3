"""The validation loader: every sample once across ranks, in a fixed order.

A rank reads whole shards when there are at least as many shards as ranks (each byte read
once), else every rank reads all of them and keeps every world_size-th sample. Bad samples are
skipped and counted by the rule of samples.py. Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .reader import ShardList, iter_records
from .samples import BadSampleStats, Opts, ReaderTally, bad_sample_error, decode_sample, identity, too_many_bad
from .batches import BatchRing, running_workers, shared_uint8, stop_workers
from .fastpath import eval_sample
from .transforms import resample_filter, resolve_decoder


class _EvalPart(IterableDataset):
    """A rank's share of the validation set; worker k reads every workers-th of its shards."""

    def __init__(self, o: Opts, ring: Optional[BatchRing] = None):
        super().__init__()
        self.o, self.ring = o, ring

    def __iter__(self) -> Iterator[Any]:
        o = self.o
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tally = ReaderTally(o.max_bad_fraction, "in validation")
        S, B = o.img_size, o.batch_size
        ring, chunk = self.ring, 0

        def space() -> Tuple[torch.Tensor, Optional[int]]:
            """Where the next chunk's pixels go: a slot of the ring (workers), else a fresh tensor."""
            if ring is None:
                return shared_uint8((B, 3, S, S), info is not None), None
            slot = ring.claim(wid, chunk)
            return ring.part(wid, slot, B)[0], slot

        images, slot = space()
        labels, keys = [], []  # type: List[int], List[str]

        def flush() -> Any:
            nonlocal images, slot, chunk
            n = len(keys)
            meta = {"worker": wid, "seen": tally.seen, "bad": tally.bad, "new_bad": tally.take_new_bad()}
            if slot is None:
                pixels = images if n == B else images[:n].clone()
            else:  # the pixels stay in the ring; the main process copies them out and frees the slot
                pixels, meta["slot"] = None, slot
            batch = (pixels, torch.tensor(labels, dtype=torch.int64), list(keys), meta)
            chunk += 1
            images, slot = space()
            del labels[:], keys[:]
            return batch

        for sid in o.shard_ids[wid::workers]:
            offset = o.offsets[sid]
            want = None if o.stride == 1 else (lambda j, off=offset: (off + j) % o.stride == o.rank)
            for _, rec in iter_records(o.shards.urls[sid], want=want):
                if rec is None:
                    continue
                tally.seen += 1
                _, label, reason = decode_sample(rec, o.num_classes, lambda data: eval_sample(
                    data, images[len(keys)], S, o.resize, o.interpolation, o.decoder))
                if reason:
                    tally.skip(rec, reason)
                    continue
                labels.append(label)
                keys.append(rec.key)
                if len(keys) == B:
                    yield flush()
        if keys or tally.new_bad:
            yield flush()


class EvalLoader:
    """Every validation sample once across ranks, in fixed order; batches of batch_size, the
    last one possibly short. Yields (images, labels) or (images, labels, keys)."""

    def __init__(self, shards: ShardList, img_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, resize: int = 0, interpolation: str = "bilinear", decoder: str = "auto",
                 max_bad_fraction: float = 0.001, return_keys: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError("rank %d is not in 0..world_size-1 (world_size=%d)" % (rank, world_size))
        resample_filter(interpolation)
        n = len(shards.urls)
        offsets = [sum(shards.counts[:i]) for i in range(n)]
        if n >= world_size:  # whole shards per rank: each byte is read once
            shard_ids, stride = list(range(rank, n, world_size)), 1
            self.num_samples = sum(shards.counts[i] for i in shard_ids)
        else:  # fewer shards than ranks: every rank reads all and keeps every world_size-th sample
            shard_ids, stride = list(range(n)), world_size
            self.num_samples = len(range(rank, shards.num_samples, world_size))
        self.o = Opts(shards=shards, img_size=img_size, batch_size=batch_size, rank=rank, stride=stride,
                       shard_ids=shard_ids, offsets=offsets, resize=resize, interpolation=interpolation,
                       decoder=resolve_decoder(decoder), max_bad_fraction=max_bad_fraction,
                       num_classes=len(shards.classes) if shards.classes else None)
        self.workers = min(workers, len(shard_ids))
        self.batch_size, self.return_keys = batch_size, return_keys
        self.classes, self.num_classes = shards.classes, self.o.num_classes
        self.stats = BadSampleStats()

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)  # an upper bound when bad samples are skipped

    @property
    def bad_samples(self) -> List[Tuple[str, str, str]]:
        return list(self.stats.examples)

    def __iter__(self) -> Iterator[Any]:
        if self.workers <= 0:
            it, ring = iter(_EvalPart(self.o)), None
        else:  # see batches.BatchRing: the DataLoader's prefetch (chunks per worker) + 1 slots
            prefetch = 2
            ring = BatchRing(self.workers, prefetch + 1, self.batch_size, self.o.img_size)
            it = running_workers(iter(DataLoader(_EvalPart(self.o, ring), batch_size=None, num_workers=self.workers,
                                                 collate_fn=identity, prefetch_factor=prefetch)))
        self.stats = BadSampleStats()
        last = {}  # type: Dict[int, Tuple[int, int]]
        pending = []  # type: List[Tuple[torch.Tensor, torch.Tensor, List[str]]]
        have = 0
        try:
            for images, labels, keys, info in it:
                # Workers send running counts; take the increase since that worker's previous chunk.
                prev = last.get(info["worker"], (0, 0))
                self.stats.add(info["seen"] - prev[0], info["bad"] - prev[1], info["new_bad"])
                last[info["worker"]] = (info["seen"], info["bad"])
                if too_many_bad(self.stats.bad, self.stats.seen, self.o.max_bad_fraction):
                    raise bad_sample_error(self.stats.bad, self.stats.seen, self.o.max_bad_fraction,
                                           self.stats.examples, "in validation")
                if "slot" in info:
                    images = ring_copy(ring, info["worker"], info["slot"], len(keys))
                if len(keys):
                    pending.append((images, labels, keys))
                    have += len(keys)
                while have >= self.batch_size:
                    yield self._take(pending, self.batch_size)
                    have -= self.batch_size
            if have:
                yield self._take(pending, have)
        finally:
            stop_workers(it, ring)

    def _take(self, pending: List[Any], n: int) -> Any:
        """Cut the first n samples off the pending chunks (chunks stay in arrival order)."""
        parts_i, parts_l, parts_k = [], [], []  # type: List[torch.Tensor], List[torch.Tensor], List[str]
        need = n
        while need:
            images, labels, keys = pending[0]
            take = min(need, len(keys))
            parts_i.append(images[:take])
            parts_l.append(labels[:take])
            parts_k.extend(keys[:take])
            if take == len(keys):
                pending.pop(0)
            else:
                pending[0] = (images[take:], labels[take:], keys[take:])
            need -= take
        images = parts_i[0] if len(parts_i) == 1 else host_cat(parts_i)
        labels = parts_l[0] if len(parts_l) == 1 else torch.cat(parts_l)
        out = (images.contiguous(), labels)
        return out + (parts_k,) if self.return_keys else out


def ring_copy(ring: BatchRing, reader: int, slot: int, n: int) -> torch.Tensor:
    """The first n images of a ring slot, copied out (numpy's single-threaded copy); the slot is freed."""
    out = torch.from_numpy(ring.part(reader, slot, n)[0].numpy().copy())
    ring.release(reader, slot)
    return out


def host_cat(parts: List[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0; on the host with numpy's single-threaded copy (torch's intra-op threads
    would wait on cores the loader workers keep busy)."""
    if parts[0].device.type != "cpu":
        return torch.cat(parts)
    return torch.from_numpy(np.concatenate([p.numpy() for p in parts]))
