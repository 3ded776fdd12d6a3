"""The training loader over webdataset shards: deterministic, resumable, the same order on any layout.

The order of an epoch. The epoch is read as `data.streams` (V) virtual streams, a number that
belongs to the run, not to the machines: shards are permuted with (seed, epoch) and dealt to
the V streams balanced by sample count (`reader.plan_streams`), and each stream shuffles its
samples through its own seeded buffer of raw (undecoded) records. Call c of the epoch (one
`train_step` of every process: the global call batch Gc = batch_size x world_size images)
takes the q = Gc / V consecutive samples [c q, (c + 1) q) of every stream. The crop, flip and
augmentations of a sample are drawn from a generator seeded by (seed, epoch, stream, position).

Who reads what. Process r of W owns the streams v with v % W == r; DataLoader worker k of its
K workers owns every K-th of those. Each worker yields its part of every call (q samples per
stream it owns); the process lays the parts out by stream, so its batch holds, for each of its
streams in increasing order, that stream's q samples. Hence, whatever W and K:
  - the set of samples of every call (and the epoch's samples) is the same, and each sample
    has the same crop; only which process computes it changes (its gradient's summation
    order, dropout and batch mixing are drawn per process, so losses agree within noise);
  - with W fixed, the process's batch is identical for any K (bit-exact resume when only
    data.workers changed).
V must divide Gc and be a multiple of W (every process reads V / W whole streams); at most
V / W workers per process are used. `data.streams: 0` picks V from the run alone: the largest
power of two that divides Gc and is at most the shard count and 64.

Equal batches. Every stream gives q samples per call, so every process has the same number of
calls per epoch: floor(smallest stream's samples / q), a constant known from the manifest.
data.resampled=true draws each stream's shards with replacement instead (num_samples // Gc
calls per epoch). A stream that lost samples to bad data tops up its last call with its last
input samples again (new crops), so bad data never makes processes unequal.

Bad samples. A sample whose image is missing or does not decode, or whose label is missing or
out of range, is skipped, counted and recorded as (key, shard, reason). The loader raises
DataError when the bad count exceeds both BAD_SAMPLE_GRACE (10) and max_bad_fraction x samples
seen so far (per stream in an epoch, and per process since the run started; a resume carries
the counts; the rule is samples.py's). Errors in workers re-raise in the main process.

Resume. `state_dict()` gives the next call's position: epoch, call, and for each stream of this
process (output position, samples seen, bad). A checkpoint gathers the states of every process;
`load_state_dict` takes each stream's position from whichever process read it, so a run resumes
on another number of processes or workers. Each stream's shard plan and shuffle draws are
replayed on indices only: no data is read for consumed samples, and no shard wholly behind the
resume point is opened.

Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import random
import signal
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import SampleAugment
from .reader import (DataError, ResumeMismatch, ShardList, plan_streams, resampled_shards, samples_per_stream,
                     stream_records)
from .samples import BadSampleStats, Opts, ReaderTally, bad_sample_error, decode_sample, identity, too_many_bad
from .settings import check_decode_place
from .batches import BatchRing, PixelBatch, new_train_batch, running_workers, stop_workers
from .device_decode import DeviceDecoder
from .transforms import describe_decoder, resample_filter, resolve_decoder

STATE_VERSION = 2
MAX_AUTO_STREAMS = 64

Position = List[int]  # [output position (cursor), samples seen, bad samples] of one stream in its epoch


def auto_streams(global_batch: int, num_shards: int, resampled: bool) -> int:
    """data.streams 0: the largest power of two dividing the global call batch, at most 64 and
    (unless resampled) at most the shard count. Independent of the number of processes."""
    cap = MAX_AUTO_STREAMS if resampled else min(MAX_AUTO_STREAMS, num_shards)
    v = 1
    while v * 2 <= cap and global_batch % (v * 2) == 0:
        v *= 2
    return v


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _worker_signals(_worker_id: int) -> None:
    """A worker forked while the trainer catches its stop signals (engine/stop.py) would inherit
    that handler. SIGTERM, SIGHUP and SIGINT get their defaults back: the DataLoader stops its
    workers with SIGTERM. SIGUSR1/2, which a scheduler may send to every process of a job so that
    it checkpoints, are ignored: the main process decides, and needs no worker after the step."""
    for name, action in (("SIGTERM", signal.SIG_DFL), ("SIGHUP", signal.SIG_DFL), ("SIGINT", signal.default_int_handler),
                         ("SIGUSR1", signal.SIG_IGN), ("SIGUSR2", signal.SIG_IGN)):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, action)


class _EpochPart(IterableDataset):
    """One epoch of one process, from call `start`: each DataLoader worker plays one reader,
    yielding its part (q samples of each stream it owns) of every call."""

    def __init__(self, o: Opts, epoch: int, start: int, positions: Dict[int, Position],
                 ring: Optional[BatchRing] = None):
        super().__init__()
        self.o, self.epoch, self.start, self.positions, self.ring = o, epoch, start, positions, ring

    def __iter__(self) -> Iterator[Any]:
        o = self.o
        info = get_worker_info()
        wid = info.id if info is not None else 0
        mine = o.rank_streams[wid::o.readers]  # workers=0: the one reader, in-process, reads them all
        plan = None if o.resampled else plan_streams(o.shards.counts, o.streams, o.seed, self.epoch)
        readers = [self._stream(v, plan) for v in mine]
        q = o.per_stream
        n = q * len(mine)
        for call in range(self.start, o.calls_per_epoch):
            slot = None if self.ring is None else self.ring.claim(wid, call)
            if slot is None:
                batch, labels = new_train_batch(o, n, info is not None), torch.empty((n,), dtype=torch.int64)
            else:  # written in place in the ring: only keys, positions and the slot travel
                images, labels = self.ring.part(wid, slot, n)
                batch = PixelBatch(n, o.img_size, False, images)
            keys = []  # type: List[str]
            positions, new_bad = {}, []
            for j, read in enumerate(readers):
                v, pos, bad = read(batch, labels, keys, j * q)
                positions[v] = pos
                new_bad += bad
            if slot is None:
                yield batch.images, labels, keys, {"positions": positions, "new_bad": new_bad}
            else:
                yield None, None, keys, {"positions": positions, "new_bad": new_bad, "slot": (wid, slot)}

    def _stream(self, v: int, plan: Optional[List[List[int]]]):
        """A function filling q slots of a part from stream v: -> (v, its position, new bad samples)."""
        o = self.o
        cursor, seen, bad = self.positions[v]
        tally = ReaderTally(o.max_bad_fraction, "by stream %d (rank %d)" % (v, o.rank), seen, bad)
        if plan is None:
            shard_ids = resampled_shards(len(o.shards.urls), o.seed, self.epoch, v)  # type: Any
            total = None  # type: Optional[int]
        else:
            shard_ids = plan[v]
            total = sum(o.shards.counts[s] for s in shard_ids)
        rng = random.Random("shuffle/%d/%d/%d" % (o.seed, self.epoch, v))
        records = stream_records(o.shards, shard_ids, o.shuffle_buffer, rng, cursor, total, ring=o.per_stream)
        scale, ratio = tuple(o.scale), tuple(o.ratio)
        augment = _sample_augment(o)
        state = [cursor]

        def fill(batch: Any, labels: torch.Tensor, keys: List[str], first: int):
            n = 0
            while n < o.per_stream:
                try:
                    pos, rec = next(records)
                except StopIteration:
                    raise DataError("stream %d of epoch %d ran out of samples with no good sample to top "
                                    "up from (all of its input was bad?)" % (v, self.epoch)) from None
                state[0], tally.seen = pos + 1, tally.seen + 1
                crop_rng = random.Random("%d/%d/%d/%d" % (o.seed, self.epoch, v, pos))
                _, label, reason = decode_sample(rec, o.num_classes, lambda data: batch.put(
                    first + n, data, crop_rng, scale, ratio, o.interpolation, o.hflip, o.decoder, augment))
                if reason:
                    tally.skip(rec, reason)
                    continue
                labels[first + n] = label
                keys.append(rec.key)
                n += 1
            return v, [state[0], tally.seen, tally.bad], tally.take_new_bad()

        return fill


def _sample_augment(o: Opts) -> Optional[SampleAugment]:
    """The reader's per-sample augmentations (built in the worker from plain settings), or None."""
    aug = SampleAugment(o.auto_augment, o.rand_augment, o.random_erasing, o.mean, o.std, o.interpolation,
                        o.img_size)
    return aug if aug.enabled else None


class TrainLoader:
    """Endless (images uint8 [B,3,H,W], labels int64 [B]) batches, epoch after epoch.

    `batches_per_epoch` batches per epoch, the same on every process. `state_dict()` /
    `load_state_dict()` give and restore the position of the next batch. `auto_augment`,
    `rand_augment`, `random_erasing` (with the normalization `mean`/`std` as erasing's fill)
    add per-sample augmentations after crop and flip (see augment.py). `streams` is data.streams
    (0 = auto); `shuffle_buffer` is per stream. `decode="gpu"`: the workers ship JPEG bytes with
    their crop boxes and flips, and batches come out decoded on `decode_device` (see batches.py
    and device_decode.py).
    """

    def __init__(self, shards: ShardList, img_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, shuffle_buffer: int = 1000, resampled: bool = False,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (0.75, 4.0 / 3.0),
                 interpolation: str = "bilinear", hflip: float = 0.5, decoder: str = "auto",
                 max_bad_fraction: float = 0.001, return_keys: bool = False, pin_memory: bool = False,
                 prefetch_factor: int = 2, auto_augment: str = "", rand_augment: str = "",
                 random_erasing: float = 0.0, mean: Sequence[float] = (127.5, 127.5, 127.5),
                 std: Sequence[float] = (127.5, 127.5, 127.5), streams: int = 0, log=None, decode: str = "cpu",
                 decode_device: str = "cuda"):
        if not 0 <= rank < world_size:
            raise ValueError("rank %d is not in 0..world_size-1 (world_size=%d)" % (rank, world_size))
        if batch_size < 1 or img_size < 1:
            raise ValueError("batch_size and img_size must be positive, got %d and %d" % (batch_size, img_size))
        resample_filter(interpolation)  # fail now, not in a worker
        check_decode_place(decode, [k for k, v in (("data.auto_augment", auto_augment),
                                                   ("data.rand_augment", rand_augment),
                                                   ("data.random_erasing", random_erasing)) if v])
        global_batch = batch_size * world_size
        num_streams = streams or auto_streams(global_batch, len(shards.urls), resampled)
        per_stream, calls = _check_layout(shards, num_streams, global_batch, world_size, resampled, bool(streams))
        rank_streams = list(range(rank, num_streams, world_size))
        readers = min(max(workers, 1), len(rank_streams))
        if workers > readers and rank == 0 and log is not None:
            log("data.workers %d: this process reads %d of the %d streams (data.streams), one worker each, so %d "
                "worker(s) run; for more, start a run with data.streams a multiple of processes x workers that "
                "divides the global batch %d" % (workers, len(rank_streams), num_streams, readers, global_batch))
        self.o = Opts(shards=shards, img_size=img_size, batch_size=batch_size, seed=seed, rank=rank,
                      world_size=world_size, workers=workers, readers=readers, shuffle_buffer=shuffle_buffer,
                      resampled=resampled, streams=num_streams, rank_streams=rank_streams, per_stream=per_stream,
                      calls_per_epoch=calls, global_batch=global_batch, scale=list(scale), ratio=list(ratio),
                      interpolation=interpolation, hflip=hflip, decoder=resolve_decoder(decoder),
                      max_bad_fraction=max_bad_fraction, num_classes=len(shards.classes) if shards.classes else None,
                      auto_augment=auto_augment, rand_augment=rand_augment, random_erasing=random_erasing,
                      mean=list(mean), std=list(std), decode=decode)
        _sample_augment(self.o)  # a bad name or a missing library fails now, not in a worker
        self.batches_per_epoch = calls
        self.samples_per_epoch = calls * batch_size  # per process
        self.num_samples = shards.num_samples
        self.num_streams = num_streams
        self.classes = shards.classes
        self.num_classes = self.o.num_classes
        self.return_keys, self.pin_memory, self.prefetch_factor = return_keys, pin_memory, prefetch_factor
        self.stats = BadSampleStats()
        self._epoch, self._batch = 0, 0
        self._positions = self._fresh_positions()
        self.device_decoder = DeviceDecoder(decode_device) if decode == "gpu" else None

    def describe(self) -> str:
        """One line for the run's log: workers, and how JPEGs are decoded here (and why not faster)."""
        o = self.o
        how = "on the device (data.decode: gpu)" if o.decode == "gpu" else describe_decoder(o.decoder)
        return "data: %d worker(s) per process (%d reading), %d streams; JPEG decoding: %s" % (
            o.workers, o.readers, o.streams, how)

    def _fresh_positions(self) -> Dict[int, Position]:
        return {v: [0, 0, 0] for v in self.o.rank_streams}

    @property
    def bad_samples(self) -> List[Tuple[str, str, str]]:
        """Up to 20 (key, shard, reason) of the bad samples skipped so far (count: stats.bad)."""
        return list(self.stats.examples)

    @property
    def epoch(self) -> int:
        return self._epoch

    def _order_settings(self) -> Dict[str, Any]:
        """What fixes the order of samples (a resume must match all of it)."""
        o = self.o
        return {"seed": o.seed, "streams": o.streams, "global_batch": o.global_batch, "shuffle_buffer": o.shuffle_buffer,
                "resampled": o.resampled, "num_shards": len(o.shards.urls), "num_samples": o.shards.num_samples}

    def state_dict(self) -> Dict[str, Any]:
        o = self.o
        positions = [list(self._positions[v]) if v in self._positions else None for v in range(o.streams)]
        out = {"version": STATE_VERSION, "epoch": self._epoch, "batch": self._batch, "rank": o.rank,
               "world_size": o.world_size, "workers": o.workers, "batch_size": o.batch_size, "positions": positions,
               "seen": self.stats.seen, "bad": self.stats.bad, "bad_examples": [list(e) for e in self.stats.examples]}
        out.update(self._order_settings())
        return out

    def load_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        """Continue at the saved next batch. `state` is one process's state_dict, or
        {"per_rank": [state of rank 0, rank 1, ...]} (a checkpoint's, from all_gather_object),
        saved on any number of processes and workers.

        Exactness needs the same order settings (seed, data.streams, global batch, shuffle
        buffer, shards; strict=True raises ResumeMismatch naming the changes, strict=False
        restarts the saved epoch at batch 0). A stream whose position no given state holds
        (one process's state loaded alone) is placed assuming it met no bad samples.
        """
        states = list(state["per_rank"]) if "per_rank" in state else [state]
        first = states[0]
        if int(first.get("version", 1)) < STATE_VERSION:
            if strict:
                raise ResumeMismatch("the saved data position is in the per-reader order of an older vit-accel, "
                                     "which this version does not continue; load_state_dict(state, strict=False) "
                                     "restarts its epoch", ["data order version 1 -> %d" % STATE_VERSION])
            self._restart_epoch(int(first["epoch"]))
            return
        mine = self._order_settings()
        diff = ["%s %r -> %r" % (k, first.get(k), v) for k, v in mine.items() if first.get(k) != v]
        self._epoch, self._batch = int(first["epoch"]), int(first["batch"])
        self.stats = self._carried_stats(states)
        if diff:
            if strict:
                raise ResumeMismatch("cannot resume the data order exactly, the loader changed: %s. Use the saved "
                                     "settings, or load_state_dict(state, strict=False) to restart epoch %d"
                                     % ("; ".join(diff), self._epoch), diff)
            self._batch, self._positions = 0, self._fresh_positions()
            return
        if any((int(s["epoch"]), int(s["batch"])) != (self._epoch, self._batch) for s in states):
            raise DataError("the saved per-process data positions disagree: %s"
                            % ", ".join("rank %s at epoch %s batch %s" % (s.get("rank"), s["epoch"], s["batch"])
                                        for s in states))
        if not 0 <= self._batch < self.batches_per_epoch:
            raise DataError("saved batch %d is outside 0..%d" % (self._batch, self.batches_per_epoch - 1))
        q = self.o.per_stream
        self._positions = {}
        for v in self.o.rank_streams:
            saved = next((s["positions"][v] for s in states if s["positions"][v] is not None), None)
            self._positions[v] = [int(x) for x in saved] if saved is not None else [self._batch * q] * 2 + [0]

    def _restart_epoch(self, epoch: int) -> None:
        self._epoch, self._batch, self._positions = epoch, 0, self._fresh_positions()

    def _carried_stats(self, states: List[Dict[str, Any]]) -> BadSampleStats:
        """Bad-sample counts since the run started: this rank's own on the same layout, else the
        whole job's on rank 0 (so the sum over processes stays the job's)."""
        stats = BadSampleStats()
        same = len(states) == self.o.world_size and all(s.get("world_size", 1) == self.o.world_size for s in states)
        if len(states) == 1 or same:
            own = states[self.o.rank] if same else states[0]
            stats.add(int(own.get("seen", 0)), int(own.get("bad", 0)), own.get("bad_examples", []))
        elif self.o.rank == 0:
            for s in states:
                stats.add(int(s.get("seen", 0)), int(s.get("bad", 0)), s.get("bad_examples", []))
        return stats

    def _epoch_iter(self, epoch: int, start: int, positions: Dict[int, Position]
                    ) -> Tuple[Iterator[Any], Optional[BatchRing]]:
        """The epoch's parts from `start` on, and the ring its workers write pixels into (None: parts hold them)."""
        o = self.o
        positions = {v: list(p) for v, p in positions.items()}
        if o.workers <= 0:
            return iter(_EpochPart(o, epoch, start, positions)), None
        ring = None
        if o.decode == "cpu":
            part = o.per_stream * -(-len(o.rank_streams) // o.readers)
            ring = BatchRing(o.readers, self.prefetch_factor + 1, part, o.img_size)
        return running_workers(iter(DataLoader(
            _EpochPart(o, epoch, start, positions, ring), batch_size=None, num_workers=o.readers, collate_fn=identity,
            pin_memory=self.pin_memory and ring is None, prefetch_factor=self.prefetch_factor,
            worker_init_fn=_worker_signals))), ring

    def _device_decoded(self, images: Any, labels: torch.Tensor, keys: List[str], info: Dict[str, Any]):
        """A part of EncodedImages decoded on the device (a sample it cannot decode is counted and replaced)."""
        images, labels, bad = self.device_decoder(images, labels, keys)
        self.stats.add(0, len(bad), [(key, "data.decode=gpu", why) for key, why in bad])
        return images, labels, keys, info

    def _assemble(self, parts: List[Tuple[Any, ...]], ring: Optional[BatchRing]
                  ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        """The process's batch from its readers' parts: each stream's q samples, streams in increasing order.
        Parts written in the ring are copied out and their slots released."""
        if len(parts) == 1 and ring is None:
            return parts[0][0], parts[0][1], parts[0][2]
        o, q = self.o, self.o.per_stream
        if ring is not None:
            parts = [ring.part(*info["slot"], len(ks)) + (ks, info) for _, _, ks, info in parts]
        first = parts[0][0]  # on the device after decode=gpu
        pin = self.pin_memory and first.device.type == "cpu" and torch.cuda.is_available()
        images = torch.empty((o.batch_size,) + tuple(first.shape[1:]), dtype=first.dtype, device=first.device,
                             pin_memory=pin)
        labels = torch.empty((o.batch_size,), dtype=torch.int64, pin_memory=pin)
        keys = [""] * o.batch_size
        slot = {v: i for i, v in enumerate(o.rank_streams)}
        # On the host, numpy's single-threaded copies: torch's intra-op threads would wait on cores the
        # workers keep busy (measured, 2 cores, 2 workers: 35-70 ms per 224 px batch of 64 against 10 ms).
        host = images.device.type == "cpu"
        out = images.numpy() if host else images
        for k, (im, lab, ks, _) in enumerate(parts):
            src_images = im.numpy() if host else im
            for j, v in enumerate(o.rank_streams[k::o.readers]):
                dst, src = slot[v] * q, j * q
                out[dst:dst + q] = src_images[src:src + q]
                labels[dst:dst + q] = lab[src:src + q]
                keys[dst:dst + q] = ks[src:src + q]
        if ring is not None:
            for *_, info in parts:
                ring.release(*info["slot"])
        return images, labels, keys

    def _call_batch(self, parts: List[Tuple[Any, ...]], ring: Optional[BatchRing]
                    ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        """One call's parts -> the process's batch: positions and bad-sample counts taken, device-decoded
        parts decoded, the bad-sample limit checked, the parts assembled."""
        o = self.o
        for _, _, _, info in parts:
            for v, pos in info["positions"].items():
                prev = self._positions[v]
                self.stats.add(pos[1] - prev[1], pos[2] - prev[2], [])
                self._positions[v] = list(pos)
            self.stats.add(0, 0, info["new_bad"])
        if self.device_decoder is not None:  # each part on the device, then assembled like pixels
            parts = [self._device_decoded(*part) for part in parts]
        if too_many_bad(self.stats.bad, self.stats.seen, o.max_bad_fraction):
            raise bad_sample_error(self.stats.bad, self.stats.seen, o.max_bad_fraction, self.stats.examples,
                                   "on rank %d" % o.rank)
        return self._assemble(parts, ring)

    def __iter__(self) -> Iterator[Any]:
        parts_per_call = self.o.readers if self.o.workers > 0 else 1
        it, ring = self._epoch_iter(self._epoch, self._batch, self._positions)
        try:
            while True:
                for b in range(self._batch, self.batches_per_epoch):
                    try:
                        parts = [next(it) for _ in range(parts_per_call)]
                    except StopIteration:
                        raise DataError("epoch %d ended after %d of %d batches (a reader stopped early)"
                                        % (self._epoch, b, self.batches_per_epoch)) from None
                    images, labels, keys = self._call_batch(parts, ring)
                    if b + 1 == self.batches_per_epoch:
                        # The next epoch's workers start now (process spawn, shard open, first decode)
                        # and overlap this epoch's last step; this epoch's are done.
                        stop_workers(it, ring)
                        it, ring = self._epoch_iter(self._epoch + 1, 0, self._fresh_positions())
                        self._epoch, self._batch, self._positions = self._epoch + 1, 0, self._fresh_positions()
                    else:
                        self._batch = b + 1
                    yield (images, labels, keys) if self.return_keys else (images, labels)
        finally:  # an iteration that ends early ends its workers now (batches.stop_workers)
            stop_workers(it, ring)


def _check_layout(shards: ShardList, streams: int, global_batch: int, world_size: int, resampled: bool,
                  chosen: bool) -> Tuple[int, int]:
    """(samples per stream per call, calls per epoch), or DataError saying what to change."""
    what = "data.streams %d" % streams if chosen else "data.streams (auto: %d)" % streams
    if streams < 1:
        raise DataError("data.streams must be positive (0 = auto), got %d" % streams)
    if global_batch % streams:
        raise DataError("%s does not divide the global batch of a call, %d: every call takes the same number of "
                        "samples from each stream; choose one of %s" % (what, global_batch, _divisors(global_batch)))
    if streams % world_size:
        raise DataError("%s cannot be split evenly over %d processes: each reads whole streams, so a run with %d "
                        "streams runs (and resumes) on %s processes. The streams fix the sample order and belong to "
                        "the run: start a run with data.streams a multiple of every process count it will use"
                        % (what, world_size, streams, _divisors(streams)))
    per_stream = global_batch // streams
    n = len(shards.urls)
    if resampled:
        calls = shards.num_samples // global_batch
        if calls < 1:
            raise DataError("%s: %d samples are fewer than one global batch of %d"
                            % (shards.source, shards.num_samples, global_batch))
        return per_stream, calls
    if n < streams:
        raise DataError("%s has %d shards but %s needs at least one shard per stream. Fix: write at least %d "
                        "shards (make-shards --samples-per-shard %d), set data.streams to at most %d (a divisor of "
                        "the global batch %d and a multiple of the %d processes), or set data.resampled=true"
                        % (shards.source, n, what, streams, max(1, shards.num_samples // streams), n, global_batch,
                           world_size))
    smallest = samples_per_stream(shards.counts, streams)[0]
    if smallest < per_stream:
        raise DataError("%s: the smallest of %d streams holds %d samples, fewer than the %d it gives each call "
                        "(global batch %d / %d streams); use more streams, a smaller batch, or data.resampled=true"
                        % (shards.source, streams, smallest, per_stream, global_batch, streams))
    return per_stream, smallest // per_stream
