"""Host input for the IPU: the resumable shard loader, read ahead in a background thread.

One PopTorch call consumes a whole combined batch (vit-b16-ft: 17 x 32 x 4 = 2,176 images
per instance) and the host must have the next one decoded, cropped, normalized and cast to
fp16 before the call returns. The loader's worker processes decode and crop (in parallel,
``data.workers``); this thread takes their batches and normalizes the next ``depth`` of them
while the IPU runs, which poptorch.DataLoader's AsynchronousDataAccessor does in a process
of its own.

Why not poptorch.DataLoader itself: it draws samples from its own sampler and reads ahead in
another process, so the position of the batch the IPU last consumed is not known to the
host, and a checkpoint could not say where to resume. Here each batch travels with the
loader position after it (``TrainLoader.state_dict()`` taken when it was read), and
``state_dict()`` gives the position after the last batch handed to the trainer: resume is
as exact as with no read-ahead. Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

_DONE = object()


class ReadAhead:
    """Iterate ``loader`` up to ``depth`` batches ahead, applying ``prepare`` to the images
    in the reading thread; checkpoint the consumer's position, not the reader's. Closing the
    iterator stops the thread, waiting at most ``stop_timeout`` seconds for it."""

    def __init__(self, loader: Any, prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 depth: int = 2, stop_timeout: float = 30.0):
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        self.loader, self.prepare, self.depth, self.stop_timeout = loader, prepare, depth, stop_timeout
        self._state = loader.state_dict()

    def state_dict(self) -> Dict[str, Any]:
        """The loader position after the last batch this feed handed out."""
        return self._state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    @property
    def stats(self) -> Any:
        """Bad-sample counts as of the last batch handed out (the reader may be further on)."""
        from ..data.loader import BadSampleStats

        s = BadSampleStats()
        s.add(int(self._state.get("seen", 0)), int(self._state.get("bad", 0)), self._state.get("bad_examples", []))
        return s

    def _read(self, out: "queue.Queue[Tuple[Any, Any, Any]]", stop: threading.Event) -> None:
        try:
            for images, labels in self.loader:
                state = self.loader.state_dict()          # the position after this batch
                if self.prepare is not None:
                    images = self.prepare(images)
                while not stop.is_set():
                    try:
                        out.put((images, labels, state), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put((_DONE, None, None))
        except BaseException as e:  # re-raised in the consumer, with its traceback
            out.put((_DONE, None, e))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        out = queue.Queue(maxsize=self.depth)  # type: queue.Queue[Tuple[Any, Any, Any]]
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(out, stop), name="vit-accel-ipu-feed", daemon=True)
        reader.start()
        try:
            while True:
                images, labels, state = out.get()
                if images is _DONE:
                    if state is not None:
                        raise state
                    return
                self._state = state
                yield images, labels
        finally:
            _stop_reader(reader, out, stop, self.stop_timeout)


def _stop_reader(reader: threading.Thread, out: "queue.Queue[Any]", stop: threading.Event,
                 timeout: float) -> None:
    """Stop the reading thread: it sees ``stop`` at its next batch or queue wait. Bounded: at
    interpreter exit the thread may never run again (Python stops daemon threads there), and
    waiting on it forever would keep the process alive; the thread is a daemon, so leaving
    it after ``timeout`` seconds loses nothing."""
    stop.set()
    if sys.is_finalizing():
        return
    deadline = time.monotonic() + timeout
    while reader.is_alive() and time.monotonic() < deadline:
        try:                                              # unblock a reader waiting on a full queue
            out.get_nowait()
        except queue.Empty:
            pass
        reader.join(0.05)
