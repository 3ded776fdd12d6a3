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
from vit_accel.data.reader import resolve_shards

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
