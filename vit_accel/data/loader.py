"""The training loader over webdataset shards: deterministic, resumable, equal per rank.

Who reads what. An epoch's shards are permuted with (seed, epoch) and dealt to
world_size x workers readers (`reader.plan_streams`), balanced by sample count. Each
reader shuffles its samples through a seeded buffer of raw (undecoded) records, decodes,
applies the train transform with a per-sample rng seeded by (seed, epoch, reader, position),
and yields uint8 batches. A rank's DataLoader takes batch i from its worker i % workers, so
the order is fixed by (seed, epoch, world_size, workers); workers=0 reads the same single
stream in the main process as workers=1.

Equal batches. Every reader yields the same number of batches per epoch:
floor(smallest reader's samples / batch_size), a constant known from the manifest, so
`batches_per_epoch = workers x that` is the same on every rank and no DDP rank waits on
another. The building check needs at least one shard per reader (else DataError naming the
numbers and the fixes: more shards, fewer workers, or data.resampled=true, which draws
shards with replacement and gives each reader floor(samples / (readers x batch_size))
batches). A reader that lost samples to bad data tops up its last batch with its last
input samples again (new crops), so bad data never makes ranks unequal.

Bad samples. A sample whose image is missing or does not decode, or whose label is
missing or out of range, is skipped, counted and recorded as (key, shard, reason). The
loader raises DataError when the bad count exceeds both BAD_SAMPLE_GRACE (10) and
max_bad_fraction x samples seen so far (per worker and per rank, since the run started; a
resume carries the counts; the rule is samples.py's). max_bad_fraction=0 tolerates none.
Errors in workers (including a corrupt shard, which names itself) re-raise in the main process.

Resume. `state_dict()` gives the next batch's position: epoch, batch, and per worker the
number of shuffle outputs consumed. `load_state_dict` replays each reader's shard plan
and shuffle draws on indices only, reads no data for consumed samples and opens no shard
wholly behind the resume point, so iteration continues with exactly the samples and crops
of an uninterrupted run.

Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import SampleAugment
from .reader import (DataError, ResumeMismatch, ShardList, plan_streams, resampled_shards, samples_per_stream,
                     stream_records)
from .samples import BadSampleStats, Opts, ReaderTally, bad_sample_error, decode_sample, identity, too_many_bad
from .batches import check_decode_place, new_train_batch
from .device_decode import DeviceDecoder
from .transforms import resample_filter, resolve_decoder

STATE_VERSION = 1


class _TrainEpoch(IterableDataset):
    """One epoch of one rank, from batch `start`; each DataLoader worker plays one reader."""

    def __init__(self, o: Opts, epoch: int, start: int, streams: List[List[int]]):
        super().__init__()
        self.o, self.epoch, self.start, self.streams = o, epoch, start, streams

    def __iter__(self) -> Iterator[Any]:
        o = self.o
        info = get_worker_info()
        workers = max(o.workers, 1)
        wid = info.id if info is not None else 0
        # The DataLoader asks worker 0 first; rotate so that worker serves the reader owing batch `start`.
        k = (wid + self.start) % workers
        done = sum(1 for i in range(self.start) if i % workers == k)
        remaining = o.per_reader - done
        if remaining <= 0:
            return
        g = o.rank * workers + k
        cursor, seen, bad = self.streams[k]
        tally = ReaderTally(o.max_bad_fraction, "by reader %d (rank %d)" % (g, o.rank), seen, bad)
        if o.resampled:
            shard_ids = resampled_shards(len(o.shards.urls), o.seed, self.epoch, g)  # type: Any
            total = None  # type: Optional[int]
        else:
            shard_ids = plan_streams(o.shards.counts, o.world_size * workers, o.seed, self.epoch)[g]
            total = sum(o.shards.counts[s] for s in shard_ids)
        rng = random.Random("shuffle/%d/%d/%d" % (o.seed, self.epoch, g))
        records = stream_records(o.shards, shard_ids, o.shuffle_buffer, rng, cursor, total, ring=o.batch_size)
        scale, ratio = tuple(o.scale), tuple(o.ratio)
        augment = _sample_augment(o)
        B = o.batch_size
        for _ in range(remaining):
            batch = new_train_batch(o, B, info is not None)
            labels = torch.empty((B,), dtype=torch.int64)
            keys = []  # type: List[str]
            n = 0
            while n < B:
                try:
                    pos, rec = next(records)
                except StopIteration:
                    raise DataError("reader %d of epoch %d ran out of samples with no good sample to top "
                                    "up from (all of its input was bad?)" % (g, self.epoch)) from None
                cursor, tally.seen = pos + 1, tally.seen + 1
                crop_rng = random.Random("%d/%d/%d/%d" % (o.seed, self.epoch, g, pos))
                _, label, reason = decode_sample(rec, o.num_classes, lambda data: batch.put(
                    n, data, crop_rng, scale, ratio, o.interpolation, o.hflip, o.decoder, augment))
                if reason:
                    tally.skip(rec, reason)
                    continue
                labels[n] = label
                keys.append(rec.key)
                n += 1
            yield batch.images, labels, keys, {"reader": k, "cursor": cursor, "seen": tally.seen, "bad": tally.bad,
                                         "new_bad": tally.take_new_bad()}


def _sample_augment(o: Opts) -> Optional[SampleAugment]:
    """The reader's per-sample augmentations (built in the worker from plain settings), or None."""
    aug = SampleAugment(o.auto_augment, o.rand_augment, o.random_erasing, o.mean, o.std, o.interpolation,
                        o.img_size)
    return aug if aug.enabled else None


class TrainLoader:
    """Endless (images uint8 [B,3,H,W], labels int64 [B]) batches, epoch after epoch.

    `batches_per_epoch` batches per epoch, the same on every rank. `state_dict()` /
    `load_state_dict()` give and restore the position of the next batch. `auto_augment`,
    `rand_augment`, `random_erasing` (with the normalization `mean`/`std` as erasing's fill)
    add per-sample augmentations after crop and flip (see augment.py). `decode="gpu"`: the
    workers ship JPEG bytes with their crop boxes and flips, and batches come out decoded on
    `decode_device` (see batches.py and device_decode.py).
    """

    def __init__(self, shards: ShardList, img_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, shuffle_buffer: int = 1000, resampled: bool = False,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (0.75, 4.0 / 3.0),
                 interpolation: str = "bilinear", hflip: float = 0.5, decoder: str = "auto",
                 max_bad_fraction: float = 0.001, return_keys: bool = False, pin_memory: bool = False,
                 prefetch_factor: int = 2, auto_augment: str = "", rand_augment: str = "",
                 random_erasing: float = 0.0, mean: Sequence[float] = (127.5, 127.5, 127.5),
                 std: Sequence[float] = (127.5, 127.5, 127.5), decode: str = "cpu", decode_device: str = "cuda"):
        if not 0 <= rank < world_size:
            raise ValueError("rank %d is not in 0..world_size-1 (world_size=%d)" % (rank, world_size))
        if batch_size < 1 or img_size < 1:
            raise ValueError("batch_size and img_size must be positive, got %d and %d" % (batch_size, img_size))
        resample_filter(interpolation)  # fail now, not in a worker
        check_decode_place(decode, [k for k, v in (("data.auto_augment", auto_augment),
                                                   ("data.rand_augment", rand_augment),
                                                   ("data.random_erasing", random_erasing)) if v])
        readers = world_size * max(workers, 1)
        n = len(shards.urls)
        if resampled:
            per_reader = shards.num_samples // (readers * batch_size)
            if per_reader < 1:
                raise DataError("%s: %d samples cannot give every one of %d readers (%d ranks x %d workers) "
                                "a batch of %d" % (shards.source, shards.num_samples, readers, world_size,
                                                   max(workers, 1), batch_size))
        else:
            if n < readers:
                raise DataError(
                    "%s has %d shards but %d ranks x %d workers = %d readers each need at least one (a reader "
                    "without a shard would leave its rank short of batches and hang DDP). Fix: write at least "
                    "%d shards (make-shards --samples-per-shard %d), use data.workers <= %d, or set "
                    "data.resampled=true" % (shards.source, n, world_size, max(workers, 1), readers, readers,
                                             max(1, shards.num_samples // readers), max(n // world_size, 0)))
            smallest = samples_per_stream(shards.counts, readers)[0]
            per_reader = smallest // batch_size
            if per_reader < 1:
                raise DataError("%s: the smallest of %d readers gets %d samples, fewer than batch_size %d; "
                                "use a smaller batch, fewer workers, or data.resampled=true"
                                % (shards.source, readers, smallest, batch_size))
        self.o = Opts(shards=shards, img_size=img_size, batch_size=batch_size, seed=seed, rank=rank,
                       world_size=world_size, workers=workers, shuffle_buffer=shuffle_buffer, resampled=resampled,
                       scale=list(scale), ratio=list(ratio), interpolation=interpolation, hflip=hflip,
                       decoder=resolve_decoder(decoder), max_bad_fraction=max_bad_fraction,
                       num_classes=len(shards.classes) if shards.classes else None, per_reader=per_reader,
                       auto_augment=auto_augment, rand_augment=rand_augment, random_erasing=random_erasing,
                       mean=list(mean), std=list(std), decode=decode)
        _sample_augment(self.o)  # a bad name or a missing library fails now, not in a worker
        self.batches_per_epoch = per_reader * max(workers, 1)
        self.samples_per_epoch = self.batches_per_epoch * batch_size  # per rank
        self.num_samples = shards.num_samples
        self.classes = shards.classes
        self.num_classes = self.o.num_classes
        self.return_keys, self.pin_memory, self.prefetch_factor = return_keys, pin_memory, prefetch_factor
        self.stats = BadSampleStats()
        self._epoch, self._batch = 0, 0
        self._streams = self._fresh_streams()
        self.device_decoder = DeviceDecoder(decode_device) if decode == "gpu" else None

    def _fresh_streams(self) -> List[List[int]]:
        return [[0, 0, 0] for _ in range(max(self.o.workers, 1))]

    @property
    def bad_samples(self) -> List[Tuple[str, str, str]]:
        """Up to 20 (key, shard, reason) of the bad samples skipped so far (count: stats.bad)."""
        return list(self.stats.examples)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> Dict[str, Any]:
        o = self.o
        return {"version": STATE_VERSION, "epoch": self._epoch, "batch": self._batch, "seed": o.seed,
                "rank": o.rank, "world_size": o.world_size, "workers": o.workers, "batch_size": o.batch_size,
                "resampled": o.resampled, "num_shards": len(o.shards.urls), "num_samples": o.shards.num_samples,
                "streams": [list(s) for s in self._streams], "seen": self.stats.seen, "bad": self.stats.bad,
                "bad_examples": [list(e) for e in self.stats.examples]}

    def load_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        """Continue at the saved next batch. `state` is this rank's state_dict, or
        {"per_rank": [state of rank 0, rank 1, ...]} (e.g. from all_gather_object).

        Exactness needs the same seed, world_size, workers, batch_size and shards
        (strict=True raises otherwise; strict=False restarts the saved epoch at batch 0).
        A rank given another rank's state recomputes its cursors assuming no bad samples
        (exact when there were none).
        """
        o = self.o
        if "per_rank" in state:
            state = state["per_rank"][o.rank]
        mine = {"seed": o.seed, "world_size": o.world_size, "workers": o.workers, "batch_size": o.batch_size,
                "resampled": o.resampled, "num_shards": len(o.shards.urls), "num_samples": o.shards.num_samples}
        diff = ["%s %r -> %r" % (k, state.get(k), v) for k, v in mine.items() if state.get(k) != v]
        self.stats = BadSampleStats()
        self.stats.add(int(state.get("seen", 0)), int(state.get("bad", 0)), state.get("bad_examples", []))
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        if diff:
            if strict:
                raise ResumeMismatch("cannot resume the data order exactly, the loader changed: %s. Use the "
                                     "saved settings, or load_state_dict(state, strict=False) to restart epoch %d"
                                     % ("; ".join(diff), self._epoch), diff)
            self._batch, self._streams = 0, self._fresh_streams()
        elif state.get("rank") == o.rank and len(state.get("streams", [])) == max(o.workers, 1):
            self._streams = [[int(x) for x in s] for s in state["streams"]]
        else:
            K = max(o.workers, 1)
            self._streams = [[sum(1 for i in range(self._batch) if i % K == k) * o.batch_size] * 2 + [0]
                             for k in range(K)]
        if not 0 <= self._batch < self.batches_per_epoch:
            raise DataError("saved batch %d is outside 0..%d" % (self._batch, self.batches_per_epoch - 1))

    def _epoch_iter(self, epoch: int, start: int, streams: List[List[int]]) -> Iterator[Any]:
        ds = _TrainEpoch(self.o, epoch, start, [list(s) for s in streams])
        if self.o.workers <= 0:
            return iter(ds)
        return iter(DataLoader(ds, batch_size=None, num_workers=self.o.workers, collate_fn=identity,
                               pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor))

    def __iter__(self) -> Iterator[Any]:
        o = self.o
        it = self._epoch_iter(self._epoch, self._batch, self._streams)
        while True:
            for b in range(self._batch, self.batches_per_epoch):
                try:
                    images, labels, keys, info = next(it)
                except StopIteration:
                    raise DataError("epoch %d ended after %d of %d batches (a reader stopped early)"
                                    % (self._epoch, b, self.batches_per_epoch)) from None
                last = b + 1 == self.batches_per_epoch
                if last:
                    # The next epoch's workers start now (process spawn, shard open, first decode)
                    # and overlap this epoch's last step; this epoch's are done.
                    del it
                    it = self._epoch_iter(self._epoch + 1, 0, self._fresh_streams())
                k = info["reader"]
                prev_seen, prev_bad = self._streams[k][1], self._streams[k][2]
                self._streams[k] = [info["cursor"], info["seen"], info["bad"]]
                self.stats.add(info["seen"] - prev_seen, info["bad"] - prev_bad, info["new_bad"])
                if self.device_decoder is not None:
                    images, labels, bad = self.device_decoder(images, labels, keys)
                    self.stats.add(0, len(bad), [(key, "data.decode=gpu", why) for key, why in bad])
                if too_many_bad(self.stats.bad, self.stats.seen, o.max_bad_fraction):
                    raise bad_sample_error(self.stats.bad, self.stats.seen, o.max_bad_fraction, self.stats.examples,
                                     "on rank %d" % o.rank)
                if last:
                    self._epoch, self._batch, self._streams = self._epoch + 1, 0, self._fresh_streams()
                else:
                    self._batch = b + 1
                yield (images, labels, keys) if self.return_keys else (images, labels)
