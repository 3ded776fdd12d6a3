"""The IPU host feed (vit_accel/backends/ipu_feed.py): the resumable shard loader read ahead by
a thread that normalizes and casts, with checkpoints at the consumer's position."""
import sys
import threading

import pytest
import torch

import poptorch_double
from test_ipu import SMALL
from vit_accel.backends.ipu import IPUBackend
from vit_accel.backends.ipu_feed import ReadAhead
from vit_accel.config import load_recipe
from vit_accel.data.digits import ensure_digits
from vit_accel.data.loader import TrainLoader
from vit_accel.data import resolve_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    train, _, _ = ensure_digits(str(tmp_path_factory.mktemp("data")))
    return resolve_shards(train)


def loader(shards):
    return TrainLoader(shards, 16, 32, seed=3, shuffle_buffer=64)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_read_ahead_prepares_and_checkpoints_the_consumers_position(digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    r = load_recipe("vit-ti-digits", SMALL + ["ipu.half=true"])
    prepare = IPUBackend(r).prepare
    plain = loader(digits)
    want = take(iter(plain), 5)

    feed = ReadAhead(loader(digits), prepare, depth=2)
    it = iter(feed)
    got = take(it, 3)
    for (x, y), (u8, y0) in zip(got, want):
        assert x.dtype == torch.float16 and x.is_contiguous()
        torch.testing.assert_close(x, prepare(u8), rtol=0, atol=0)
        assert torch.equal(y, y0)
    for _ in range(100):                                   # the reader runs on to depth 2 (+ 1 in hand)
        if feed.loader.state_dict()["batch"] >= 5:
            break
        threading.Event().wait(0.05)
    assert feed.loader.state_dict()["batch"] >= 5 and feed.state_dict()["batch"] == 3
    state = feed.state_dict()
    it.close()

    resumed = loader(digits)
    resumed.load_state_dict(state)
    torch.testing.assert_close(prepare(next(iter(resumed))[0]), prepare(want[3][0]), rtol=0, atol=0)
    assert feed.stats.seen == 3 * 32


def test_read_ahead_stops_its_thread_and_reraises_errors(digits):
    before = threading.active_count()
    it = iter(ReadAhead(loader(digits), depth=1))
    next(it)
    it.close()
    assert threading.active_count() == before

    class Broken:
        def state_dict(self):
            return {}

        def __iter__(self):
            yield torch.zeros(1), torch.zeros(1)
            raise OSError("shard 7 is truncated")

    it = iter(ReadAhead(Broken()))
    next(it)
    with pytest.raises(OSError, match="shard 7 is truncated"):
        next(it)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ReadAhead(Broken(), depth=0)


def feed_threads():
    return [t for t in threading.enumerate() if t.name == "vit-accel-ipu-feed" and t.is_alive()]


def test_closing_waits_a_bounded_time_for_a_reader_stuck_in_the_loader():
    release = threading.Event()

    class Stuck:                                           # a loader that hangs after its first batch
        def state_dict(self):
            return {}

        def __iter__(self):
            yield torch.zeros(1), torch.zeros(1)
            release.wait(120)
            yield torch.zeros(1), torch.zeros(1)

    it = iter(ReadAhead(Stuck(), depth=1, stop_timeout=0.2))
    next(it)
    done = threading.Event()
    closer = threading.Thread(target=lambda: (it.close(), done.set()), daemon=True)
    closer.start()
    assert done.wait(60), "closing the feed waited on a reader that never returns"
    assert len(feed_threads()) == 1                        # left behind as a daemon, not waited for
    release.set()
    for _ in range(200):
        if not feed_threads():
            break
        threading.Event().wait(0.05)
    assert not feed_threads()                              # and it ends once the loader returns


@pytest.mark.slow
def test_a_failed_step_stops_the_feed_before_the_error_reaches_the_caller(tmp_path, monkeypatch):
    from vit_accel.engine.trainer import train

    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    monkeypatch.chdir(tmp_path)
    r = load_recipe("vit-ti-digits", ["schedule.total_steps=3", "schedule.warmup_steps=1", "train.eval_every=0",
                                      "data.workers=0", "ipu.loader_mode=async_rebatched", "ipu.buffer_size=2"])
    calls = []

    def failing_step(self, images, labels, lr):
        calls.append(feed_threads())
        raise RuntimeError("the IPU stopped")

    monkeypatch.setattr(IPUBackend, "train_step", failing_step)
    try:
        train(r, "ipu", run_dir=str(tmp_path / "run"), progress=False)
    except RuntimeError as e:                              # the traceback still holds the trainer's frames
        assert "the IPU stopped" in str(e)
        assert len(calls) == 1 and len(calls[0]) == 1      # the feed ran during the step...
        assert not feed_threads()                          # ...and was stopped before the error surfaced
    else:
        pytest.fail("the failing step did not fail the run")
