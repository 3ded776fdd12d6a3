"""Train/eval loaders: exactly-once epochs across ranks x workers, resume, bad data, errors."""
import gc
import io
import multiprocessing
import os
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vit_accel.data import (DataError, ResumeMismatch, build_eval_loader, build_train_loader, resolve_shards,
                            write_shards)
from vit_accel.data import EvalLoader, TrainLoader
from vit_accel.data.shards import SourceSample

IMG = 16


def _jpeg(i, size=(40, 32)):
    rng = np.random.RandomState(i)
    arr = (rng.rand(size[1] // 8, size[0] // 8, 3) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).resize(size, Image.BILINEAR).save(out, "JPEG", quality=85)
    return out.getvalue()


def cfg(**kw):
    base = dict(source="shards", root="data", train_shards="", val_shards="", mean=[127.5] * 3, std=[127.5] * 3,
                scale=[0.08, 1.0], ratio=[0.75, 1.3333333], interpolation="bilinear", hflip=0.5, eval_resize=0,
                workers=2, shuffle_buffer=16, resampled=False, max_bad_fraction=0.001, mixup=0.0, cutmix=0.0,
                decoder="pil")
    base.update(kw)
    return SimpleNamespace(**base)


def _tar(path, samples):
    """A plain tar as other tools write it: samples = [(key, {ext: bytes})]."""
    with tarfile.open(path, "w") as t:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo("%s.%s" % (key, ext))
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards8(tmp_path_factory):
    """8 shards x 24 JPEG samples, 5 classes, with a manifest."""
    d = tmp_path_factory.mktemp("shards8")
    samples = [SourceSample("s%03d" % i, i % 5, "mem", data=_jpeg(i)) for i in range(192)]
    write_shards(samples, str(d), "train", [str(c) for c in range(5)], samples_per_shard=24, log=lambda m: None)
    return str(d / "train.json")


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """4 foreign shards x 20 samples; shard i holds 2 bad samples (truncated JPEG, missing cls,
    non-image bytes, out-of-range label), so readers must top up to fill their batches."""
    d = tmp_path_factory.mktemp("bad")
    bad_kinds = [("trunc", lambda j: {"jpg": _jpeg(j)[:200], "cls": b"1"}),
                 ("nocls", lambda j: {"jpg": _jpeg(j)}),
                 ("notimg", lambda j: {"jpg": b"this is not an image", "cls": b"2"}),
                 ("badlabel", lambda j: {"jpg": _jpeg(j), "cls": b"x7"})]
    for s in range(4):
        rows = []
        for j in range(20):
            n = s * 20 + j
            if j in (3, 11):
                kind, make = bad_kinds[(s + j) % 4]
                rows.append(("b%03d_%s" % (n, kind), make(n)))
            else:
                rows.append(("g%03d" % n, {"jpg": _jpeg(n), "cls": str(n % 3).encode()}))
        _tar(str(d / ("part-%d.tar" % s)), rows)
    return str(d / "part-{0..3}.tar")


def _epoch_keys(loader, n):
    it = iter(loader)
    return [next(it)[2] for _ in range(n)]


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(shards8):
    loaders = [build_train_loader(cfg(train_shards=shards8), IMG, 8, seed=3, rank=r, world_size=2,
                                  return_keys=True) for r in range(2)]
    assert [ld.batches_per_epoch for ld in loaders] == [12, 12]  # 192 / (2 ranks x 8)
    epochs = []
    for _ in range(2):
        seen = []
        for ld in loaders:
            it = iter(ld)
            for _ in range(ld.batches_per_epoch):
                images, labels, keys = next(it)
                assert images.shape == (8, 3, IMG, IMG) and images.dtype == torch.uint8 and images.is_contiguous()
                assert labels.dtype == torch.int64 and labels.tolist() == [int(k[1:]) % 5 for k in keys]
                seen += keys
        assert sorted(seen) == ["s%03d" % i for i in range(192)]
        epochs.append(seen)
        assert all(ld.state_dict()["batch"] == 0 for ld in loaders)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert loaders[0].state_dict()["epoch"] == 2


def test_order_is_deterministic_and_seeded(shards8):
    def keys(seed, workers):
        return _epoch_keys(TrainLoader(resolve_shards(shards8), IMG, 8, seed, workers=workers, shuffle_buffer=16,
                                       return_keys=True), 6)

    assert keys(1, 2) == keys(1, 2)
    assert keys(1, 2) != keys(2, 2)
    assert keys(5, 0) == keys(5, 1)  # workers=0 reads the single stream of workers=1 in-process


@pytest.mark.parametrize("workers,stop", [(2, 5), (2, 12), (0, 7)])
def test_resume_continues_exactly(shards8, workers, stop):
    def make():
        return build_train_loader(cfg(train_shards=shards8, workers=workers), IMG, 8, seed=7, return_keys=True)

    full = make()
    it = iter(full)
    ref = [next(it) for _ in range(stop + 14)]  # crosses into the second epoch (24 batches per epoch)
    first = make()
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    import json
    state = json.loads(json.dumps(state))  # JSON-able
    resumed = make()
    resumed.load_state_dict(state)
    it = iter(resumed)
    for images, labels, keys in ref[stop:]:
        got = next(it)
        assert got[2] == keys
        assert torch.equal(got[0], images) and torch.equal(got[1], labels)  # same crops and flips too


def test_resume_does_not_read_consumed_samples(shards8, monkeypatch):
    """Skipping replays the shuffle on indices: no decode, and whole consumed shards stay closed."""
    from vit_accel.data import batches as batches_mod
    from vit_accel.data import reader as reader_mod

    opened, decoded = [], [0]
    real_iter, real_transform = reader_mod.iter_records, batches_mod.train_sample

    def spy_iter(url, want=None):
        opened.append(os.path.basename(url))
        return real_iter(url, want)

    def spy_transform(*a, **k):
        decoded[0] += 1
        return real_transform(*a, **k)

    monkeypatch.setattr(reader_mod, "iter_records", spy_iter)
    monkeypatch.setattr(batches_mod, "train_sample", spy_transform)
    ld = TrainLoader(resolve_shards(shards8), IMG, 8, 0, workers=0, shuffle_buffer=4, streams=1)
    ld.load_state_dict(dict(ld.state_dict(), batch=20, positions=[[160, 160, 0]]))
    next(iter(ld))
    assert decoded[0] == 8
    assert len(opened) <= 2  # 160 of 192 consumed with a buffer of 4: only the last shard(s) open


def test_bad_samples_skipped_reported_and_resume_exact(bad_shards):
    c = cfg(train_shards=bad_shards, workers=2, max_bad_fraction=0.2)
    ld = build_train_loader(c, IMG, 8, seed=0, return_keys=True)
    assert ld.batches_per_epoch == 10  # 4 streams of 20 samples, 2 each per batch; each stream has only 18 good
    it = iter(ld)
    ref = [next(it) for _ in range(10)]
    keys = [k for b in ref for k in b[2]]
    assert not any(k.startswith("b") for k in keys)
    assert len(set(keys)) == 72 and len(keys) == 80  # all 72 good samples, 8 topped up (new crops)
    assert ld.stats.bad == 8 and ld.stats.seen == 88  # 80 inputs + 8 top-up draws
    reasons = {k.split("_")[1]: r for k, _, r in ld.bad_samples}
    assert set(reasons) == {"trunc", "nocls", "notimg", "badlabel"}
    assert "missing label" in reasons["nocls"] and "not an integer" in reasons["badlabel"]
    assert all(s.endswith(".tar") for _, s, _ in ld.bad_samples)
    ref += [next(it) for _ in range(3)]
    for stop in (3, 9):  # mid-epoch, and inside the top-up at the end of the epoch
        first = build_train_loader(c, IMG, 8, seed=0, return_keys=True)
        it = iter(first)
        for _ in range(stop):
            next(it)
        resumed = build_train_loader(c, IMG, 8, seed=0, return_keys=True)
        resumed.load_state_dict(first.state_dict())
        it = iter(resumed)
        assert [next(it)[2] for _ in range(13 - stop)] == [b[2] for b in ref[stop:]]
        assert (resumed.stats.bad, resumed.stats.seen) == (ld.stats.bad, ld.stats.seen)  # counts carried


def test_too_many_bad_samples_raise_clear_error(bad_shards):
    # 8 bad in 80 is within the grace of 10 ...
    ld = build_train_loader(cfg(train_shards=bad_shards, max_bad_fraction=0.05), IMG, 8, seed=0)
    it = iter(ld)
    for _ in range(10):
        next(it)
    # ... but past the grace the fraction rules: 11 bad of ~110 seen > 5 %.
    with pytest.raises(DataError, match=r"max_bad_fraction=0.05.*Examples: b\d+_"):
        for _ in range(10):
            next(it)
    # max_bad_fraction=0 tolerates none
    with pytest.raises(DataError, match="1 of"):
        next(iter(build_train_loader(cfg(train_shards=bad_shards, workers=0, max_bad_fraction=0.0), IMG, 8, 0)))


def test_corrupt_shards_name_themselves(shards8, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(os.path.dirname(shards8), str(d))
    shard = d / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    with open(str(shard), "wb") as f:  # truncated: the manifest's size check catches it up front
        f.write(bytes(data[:len(data) // 2]))
    with pytest.raises(DataError, match="train-000002.tar has .* bytes but its manifest says .*make-shards"):
        build_train_loader(cfg(train_shards=str(d / "train.json")), IMG, 8, 0)
    # Same size, garbage over a member header: found while reading, in a worker, named.
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as t:
        hdr = t.getmembers()[7].offset  # the header of a member of the third sample
    data[hdr:hdr + 512] = os.urandom(512)
    shard.write_bytes(bytes(data))
    ld = build_train_loader(cfg(train_shards=str(d / "train-{000000..000007}.tar"), workers=2), IMG, 8, 0)
    it = iter(ld)
    with pytest.raises(DataError, match="train-000002.tar is corrupt") as e:
        for _ in range(ld.batches_per_epoch):
            next(it)
    # the workers are gone with the error, though its traceback still holds the loader's iterator
    assert e.value and not multiprocessing.active_children()


@pytest.mark.parametrize("kind", ["train", "eval"])
@pytest.mark.parametrize("how", ["error", "dropped", "dropped-in-a-cycle"])
def test_an_iteration_that_stops_early_ends_its_workers_at_once(shards8, tmp_path, kind, how):
    """Ended before its epoch (an error in the main process, or the iterator closed mid-way, while the
    workers wait for ring slots the main process holds), a loader ends its workers there and then: the
    DataLoader's own shutdown, left to the garbage collector, loses its message to them when an
    exception's reference cycle holds the iterator (each worker then costs the 5 s join timeout)."""
    if kind == "train":
        loader = TrainLoader(resolve_shards(shards8), IMG, 8, 0, workers=2, prefetch_factor=1)
    else:
        loader = EvalLoader(resolve_shards(shards8), IMG, 4, workers=2)
    it = iter(loader)
    next(it)
    time.sleep(0.5)  # the workers fill the ring's free slots and wait for the held ones
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    if how == "dropped":
        it.close()
    elif how == "dropped-in-a-cycle":  # freed by the garbage collector, not by its reference count
        holder = {"iteration": it}
        holder["self"] = holder
        del it, holder
        gc.collect()
    else:
        with pytest.raises(RuntimeError, match="stop here") as e:
            it.throw(RuntimeError("stop here"))  # as an exception raised inside the iteration would
        assert e.value  # its traceback holds the iterator
    assert not multiprocessing.active_children()
    assert [w.exitcode for w in workers] == [0, 0]  # they left; none was terminated after a timeout


def test_truncated_foreign_shard_is_reported(tmp_path):
    _tar(str(tmp_path / "a.tar"), [("k%d" % i, {"jpg": _jpeg(i), "cls": b"0"}) for i in range(6)])
    data = (tmp_path / "a.tar").read_bytes()
    with tarfile.open(str(tmp_path / "a.tar")) as t:
        cut = t.getmembers()[4].offset
    (tmp_path / "b.tar").write_bytes(data[:cut])  # cut at a member boundary: tarfile sees a clean end
    with pytest.raises(DataError, match="b.tar is corrupt or truncated: no end-of-archive blocks"):
        resolve_shards(str(tmp_path / "b.tar"))


def test_layout_validation_messages(tmp_path, shards8):
    for i in range(3):
        _tar(str(tmp_path / ("x-%d.tar" % i)), [("k%d_%d" % (i, j), {"jpg": _jpeg(j), "cls": b"0"})
                                                for j in range(10)])
    # 3 shards: at most 2 streams (a power of two dividing the global batch 16), which 4 processes cannot share
    with pytest.raises(DataError) as e:
        build_train_loader(cfg(train_shards=str(tmp_path)), IMG, 4, 0, rank=1, world_size=4)
    msg = str(e.value)
    for part in ("data.streams (auto: 2)", "4 processes", "runs (and resumes) on 1, 2 processes"):
        assert part in msg, msg
    with pytest.raises(DataError, match="has 3 shards but data.streams 4 needs at least one shard per stream.*"
                                        "data.resampled=true"):
        build_train_loader(cfg(train_shards=str(tmp_path), streams=4), IMG, 4, 0, rank=1, world_size=2)
    with pytest.raises(DataError, match="data.streams 3 does not divide the global batch of a call, 8"):
        build_train_loader(cfg(train_shards=str(tmp_path), streams=3), IMG, 4, 0, world_size=2)
    # 8 streams of 24 samples cannot give 32 each (global batch 2 x 128)
    with pytest.raises(DataError, match="smallest of 8 streams holds 24 samples, fewer than the 32"):
        build_train_loader(cfg(train_shards=shards8), IMG, 128, 0, world_size=2)
    # more workers than the process's streams: one worker per stream, and the log says so
    said = []
    ld = build_train_loader(cfg(train_shards=shards8, workers=6), IMG, 8, 0, world_size=2, log=said.append)
    assert ld.o.readers == 4 and "data.workers 6: this process reads 4 of the 8 streams" in said[0]


def test_resampled_mode_gives_equal_batches_with_few_shards(tmp_path):
    for i in range(3):
        _tar(str(tmp_path / ("x-%d.tar" % i)), [("k%d_%d" % (i, j), {"jpg": _jpeg(j), "cls": b"1"})
                                                for j in range(5 + 3 * i)])
    loaders = [build_train_loader(cfg(train_shards=str(tmp_path), resampled=True), IMG, 2, 0, rank=r, world_size=2,
                                  return_keys=True) for r in range(2)]
    assert [ld.batches_per_epoch for ld in loaders] == [6, 6]  # 2 workers x floor(24 / (4 readers x 2))
    for ld in loaders:
        it = iter(ld)
        batches = [next(it) for _ in range(ld.batches_per_epoch + 1)]
        assert all(b[0].shape[0] == 2 for b in batches)
        assert ld.state_dict()["epoch"] == 1 and ld.state_dict()["batch"] == 1


def test_load_state_dict_refuses_changed_order_settings(shards8):
    ld = TrainLoader(resolve_shards(shards8), IMG, 8, 0, workers=2)
    state = dict(ld.state_dict(), batch=3)
    other = TrainLoader(resolve_shards(shards8), IMG, 8, 0, workers=2, shuffle_buffer=500)
    with pytest.raises(ResumeMismatch, match="shuffle_buffer 1000 -> 500") as info:
        other.load_state_dict(state)
    assert isinstance(info.value, DataError) and info.value.changes == ["shuffle_buffer 1000 -> 500"]
    other.load_state_dict(state, strict=False)
    assert other.state_dict()["batch"] == 0
    # a position saved by an older vit-accel (per-reader order) is refused, or restarts its epoch
    old = {"version": 1, "epoch": 2, "batch": 5, "streams": [[40, 40, 0]]}
    with pytest.raises(ResumeMismatch, match="older vit-accel"):
        ld.load_state_dict(old)
    ld.load_state_dict(old, strict=False)
    assert (ld.state_dict()["epoch"], ld.state_dict()["batch"]) == (2, 0)
    # another process's state alone (or a per_rank list) resumes at the same batch
    r1 = TrainLoader(resolve_shards(shards8), IMG, 8, 0, rank=1, world_size=2, workers=2)
    r0 = TrainLoader(resolve_shards(shards8), IMG, 8, 0, rank=0, world_size=2, workers=2)
    r1.load_state_dict(dict(r0.state_dict(), batch=5))
    assert r1.state_dict()["batch"] == 5 and r1.state_dict()["positions"][1] == [5 * 2, 5 * 2, 0]


@pytest.mark.parametrize("spec_shards,workers", [(8, 2), (1, 2), (8, 0)])
def test_eval_covers_every_sample_once_across_2_ranks(tmp_path, spec_shards, workers):
    samples = [SourceSample("v%03d" % i, i % 4, "mem", data=_jpeg(i, (30 + i % 7, 20 + i % 5)))
               for i in range(61)]
    write_shards(samples, str(tmp_path), "val", list("abcd"), samples_per_shard=-(-61 // spec_shards),
                 log=lambda m: None)
    keys, sizes = [], []
    for r in range(2):
        ld = build_eval_loader(cfg(val_shards=str(tmp_path / "val.json"), workers=workers), IMG, 10, rank=r,
                               world_size=2, return_keys=True)
        part = []
        batches = list(ld)
        assert len(batches) == len(ld)
        for images, labels, k in batches:
            assert images.shape[1:] == (3, IMG, IMG) and images.dtype == torch.uint8
            assert labels.tolist() == [int(x[1:]) % 4 for x in k]
            part += k
            sizes.append(len(k))
        assert all(s == 10 for s in [len(b[2]) for b in batches][:-1])  # only the last may be short
        keys.append(part)
    assert not set(keys[0]) & set(keys[1]) and keys[0] and keys[1]
    assert sorted(keys[0] + keys[1]) == ["v%03d" % i for i in range(61)]


def test_eval_transform_is_resize_then_center_crop(tmp_path):
    # Columns carry their x position; after center-cropping 16 of 32 columns we see 8..23.
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :, 0] = np.arange(32)[None, :] * 8
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    _tar(str(tmp_path / "v.tar"), [("a", {"png": out.getvalue(), "cls": b"0"})])
    images, _ = next(iter(EvalLoader(resolve_shards(str(tmp_path / "v.tar")), 16, 4)))
    assert images[0, 0, 0].tolist() == [x * 8 for x in range(8, 24)]


def test_missing_and_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data.train_shards is empty"):
        build_train_loader(cfg(), IMG, 8, 0)
    with pytest.raises(DataError, match="do not exist"):
        build_train_loader(cfg(train_shards=str(tmp_path / "t-{0..3}.tar")), IMG, 8, 0)
    with pytest.raises(DataError, match="data.source must be"):
        build_train_loader(cfg(source="imagenet"), IMG, 8, 0)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("seekable", [True, False])
def test_tar_reader_agrees_with_tarfile(fmt, seekable):
    """Our header parser (used instead of tarfile for speed) on long, nested and non-ASCII names."""
    from vit_accel.data.reader import TarStream

    names = ["a.jpg", "dir/" * 30 + "f.cls"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["d/" * 60 + "long.cls", "ünï/cödé.jpg", "x" * 99 + ".png"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for n in names:
            data = n.encode() * 3
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        t.addfile(info)
    buf.seek(0)
    ts = TarStream(buf, "mem", seekable)
    got = []
    while True:
        member = ts.next_member()
        if member is None:
            break
        name, is_file = member
        # Skip reading one member's data: the next header must still be found.
        got.append((name.rstrip("/"), is_file, ts.read_data() if is_file and name != "a.jpg" else None))
    assert [g[0] for g in got] == names + ["somedir"] and [g[1] for g in got] == [True] * len(names) + [False]
    assert all(data == name.encode() * 3 for name, _, data in got if data is not None)


def test_reader_datasets_pickle_for_spawned_workers(shards8):
    import pickle

    from vit_accel.data.loader import _EpochPart

    ld = TrainLoader(resolve_shards(shards8), IMG, 8, 0, workers=2)
    ds = pickle.loads(pickle.dumps(_EpochPart(ld.o, 0, 0, {v: [0, 0, 0] for v in range(8)})))
    assert len(next(iter(ds))[2]) == 4   # worker 0's part: 4 of the 8 streams, one sample each


# ---------------------------------------------------------------------------------------
# One order for every layout: the samples of each call depend on (seed, epoch, data.streams)
# and the global batch, not on how many processes and workers read them
# ---------------------------------------------------------------------------------------

def _calls(shards, world, workers, n, global_batch=16, spec=None, states=None, **kw):
    """n calls of a world-process job in one process: per call, key -> image bytes over every rank."""
    loaders = [build_train_loader(cfg(train_shards=shards, workers=workers, **kw), IMG, global_batch // world, seed=4,
                                  rank=r, world_size=world, return_keys=True) for r in range(world)]
    if states is not None:
        for ld in loaders:
            ld.load_state_dict({"per_rank": states})
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(n):
        call = {}
        for it in its:
            images, _, keys = next(it)
            call.update({k: images[i].numpy().tobytes() for i, k in enumerate(keys)})
        out.append(call)
    return out, [ld.state_dict() for ld in loaders]


def test_every_layout_reads_the_same_samples_with_the_same_crops_in_every_call(shards8):
    ref, _ = _calls(shards8, 1, 0, 12)          # one epoch: 8 streams x 2 samples x 12 calls = 192
    assert sorted(k for c in ref for k in c) == ["s%03d" % i for i in range(192)]
    for world, workers in [(1, 2), (2, 0), (2, 2), (4, 1), (8, 2)]:
        got, _ = _calls(shards8, world, workers, 12)
        assert got == ref, (world, workers)     # the same keys per call, each with the same pixels


def test_same_process_count_any_workers_gives_identical_batches(shards8):
    def batches(workers):
        ld = build_train_loader(cfg(train_shards=shards8, workers=workers), IMG, 8, seed=4, rank=1, world_size=2,
                                return_keys=True)
        it = iter(ld)
        return [next(it) for _ in range(13)]   # into the second epoch

    a, b = batches(0), batches(4)
    assert all(x[2] == y[2] and torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_the_partial_decoder_in_workers_gives_the_exact_paths_batches_and_bad_samples(shards8, bad_shards):
    """data.decoder=libjpeg (what auto picks where it builds) against torchvision's full decode:
    the same pixels in every batch from loader workers, the same bad samples skipped and named."""
    from vit_accel.data import jpeg_region

    if jpeg_region.unavailable():
        pytest.skip("the partial decoder does not build here: %s" % jpeg_region.unavailable())

    def batches(shards, decoder, workers, n):
        ld = build_train_loader(cfg(train_shards=shards, workers=workers, decoder=decoder, max_bad_fraction=0.5),
                                24, 8, seed=3, rank=0, world_size=1, return_keys=True)
        it = iter(ld)
        return [next(it) for _ in range(n)], ld

    decoded = []
    real = jpeg_region.decode_box
    with pytest.MonkeyPatch.context() as mp:  # in this process (workers=0): the crops do go the partial way
        mp.setattr(jpeg_region, "decode_box", lambda *a: decoded.append(real(*a)) or decoded[-1])
        batches(shards8, "libjpeg", 0, 2)
    assert len(decoded) == 16 and all(d is not None for d in decoded)
    for shards, n in ((shards8, 13), (bad_shards, 9)):
        (a, la), (b, lb) = batches(shards, "libjpeg", 2, n), batches(shards, "torchvision", 0, n)
        assert all(x[2] == y[2] and torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
        named = [sorted((key, shard) for key, shard, _ in ld.bad_samples) for ld in (la, lb)]
        assert la.stats.bad == lb.stats.bad and named[0] == named[1]
    assert la.stats.bad == 8  # the bad shards' truncated, label-less, non-image and mislabelled samples


def test_the_loader_says_how_it_decodes(shards8, monkeypatch):
    from vit_accel.data import jpeg_region

    line = build_train_loader(cfg(train_shards=shards8, workers=2, decoder="torchvision"), IMG, 8, seed=0).describe()
    assert line == "data: 2 worker(s) per process (2 reading), 8 streams; JPEG decoding: torchvision"
    monkeypatch.setattr(jpeg_region, "_state", {"lib": None, "why": "no C compiler (cc) on PATH"})
    line = build_train_loader(cfg(train_shards=shards8, workers=0, decoder="auto"), IMG, 8, seed=0).describe()
    assert line.endswith("JPEG decoding: torchvision (whole images; the partial decoder: no C compiler (cc) on PATH)")
    monkeypatch.undo()
    if not jpeg_region.unavailable():
        line = build_train_loader(cfg(train_shards=shards8, workers=0, decoder="auto"), IMG, 8, seed=0).describe()
        assert line.endswith("JPEG decoding: libjpeg, only each crop's rows and columns")


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 2)])
def test_resume_on_another_process_count_continues_the_epoch_exactly(bad_shards, before, after):
    """Bad samples shift each stream's position differently: the per-stream positions carry over."""
    kw = dict(max_bad_fraction=0.2)
    ref, _ = _calls(bad_shards, 1, 0, 14, global_batch=8, **kw)   # 10 calls per epoch, into the next
    first, states = _calls(bad_shards, before, 1, 6, global_batch=8, **kw)
    assert first == ref[:6]
    rest, _ = _calls(bad_shards, after, 1, 8, global_batch=8, states=states, **kw)
    assert rest == ref[6:]
    epoch = [k for c in first + rest[:4] for k in c]
    assert not any(k.startswith("b") for k in epoch) and len(set(epoch)) == 72   # every good sample, none twice but the top-ups
    assert sorted(set(epoch)) == sorted({k for c in ref[:10] for k in c})


def test_three_processes_resume_a_two_process_run_when_they_divide_the_streams(shards8):
    """Formerly an IndexError; now a working resume when 3 divides data.streams, else a clear error."""
    ref, _ = _calls(shards8, 1, 0, 5, global_batch=48, streams=6)   # 3 calls per epoch, into the next
    first, states = _calls(shards8, 2, 1, 2, global_batch=48, streams=6)
    rest, _ = _calls(shards8, 3, 1, 3, global_batch=48, streams=6, states=states)
    assert first + rest == ref
    with pytest.raises(DataError, match=r"data.streams \(auto: 8\) cannot be split evenly over 3 processes.*"
                                        r"runs \(and resumes\) on 1, 2, 4, 8 processes"):
        build_train_loader(cfg(train_shards=shards8), IMG, 16, 0, rank=2, world_size=3)


def test_batch_ring_slots_wait_for_release_and_workers_write_in_place(shards8):
    import threading
    import time

    from vit_accel.data.batches import BatchRing

    from vit_accel.data.batches import check_shared_memory

    folder = os.path.dirname(shards8)
    st = os.statvfs(folder)
    check_shared_memory(1, folder)
    with pytest.raises(DataError, match="--shm-size") as e:  # more than the folder's free space
        check_shared_memory(st.f_bavail * st.f_frsize + 2 ** 30, folder)
    assert "data.workers" in str(e.value) and folder in str(e.value)
    # the loaders check before any worker starts
    tiny = os.statvfs_result((4096, 4096, 1, 1, 1, 1, 1, 1, 0, 255))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vit_accel.data.batches.os.statvfs", lambda path: tiny)
        for loader in (TrainLoader(resolve_shards(shards8), IMG, 8, 0, workers=2),
                       EvalLoader(resolve_shards(shards8), IMG, 8, workers=2)):
            with pytest.raises(DataError, match="shared-memory batches need"):
                next(iter(loader))
    ring = BatchRing(readers=2, slots=3, part_size=4, img_size=IMG)
    assert ring.images.is_shared() and ring.labels.is_shared() and ring.busy.is_shared()
    assert [ring.claim(1, c) for c in (0, 1, 2)] == [0, 1, 2]
    assert ring.claim(0, 3) == 0  # each reader has its own slots
    done = []
    waiter = threading.Thread(target=lambda: done.append(ring.claim(1, 3)))
    waiter.start()
    time.sleep(0.1)
    assert not done  # call 3 reuses slot 0, which the main process still holds
    ring.release(1, 0)
    waiter.join(timeout=10)
    assert done == [0]

    # a worker waiting on a slot of a training process that is gone (SIGKILL) exits instead of waiting forever
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ring.owner = gone.pid
    with pytest.raises(SystemExit, match="is gone"):
        ring.claim(1, 4, poll=0.0001)  # slot 1 is still held

    # with workers, the batch is copied out of the ring: a batch kept by the caller is never overwritten
    ld = TrainLoader(resolve_shards(shards8), IMG, 8, 0, workers=2, prefetch_factor=1)
    it = iter(ld)
    kept = [next(it) for _ in range(ld.batches_per_epoch + 3)]
    assert not any(images.is_shared() for images, _ in kept)
    ref = TrainLoader(resolve_shards(shards8), IMG, 8, 0, workers=0)
    ref_it = iter(ref)
    for images, labels in kept:
        want_images, want_labels = next(ref_it)
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)

    # validation: the same pixels per sample with or without workers, copied out of the ring
    def by_key(workers):
        out = {}
        for images, _, keys in EvalLoader(resolve_shards(shards8), IMG, 5, workers=workers, return_keys=True):
            assert not images.is_shared() or workers == 0
            out.update({k: images[i].clone() for i, k in enumerate(keys)})
        return out

    ref_eval, got = by_key(0), by_key(2)
    assert sorted(got) == sorted(ref_eval) and len(got) == 192
    assert all(torch.equal(got[k], ref_eval[k]) for k in ref_eval)
