"""Writing checkpoints so that a kill at any moment leaves a usable one: completion markers and
the (optionally asynchronous) writer.

A checkpoint ``checkpoints/step_N.pt`` (with ``step_N.ds/`` under DeepSpeed) is complete only
once ``step_N.done`` exists: a small JSON file written last, after every process's part is on
disk (written, fsynced, and the processes past a barrier), listing each file of the checkpoint
with its size. Resuming checks the marker and the sizes, so a save killed half-way (a process,
a node, the job) leaves the previous complete checkpoint the newest one.

``train.async_checkpoint``: the save takes a snapshot of the payload in host memory on the
training thread (the only stall) and a background thread writes it, then the marker; the next
save waits for the previous one, and the run's end waits for the last. A crash mid-write
leaves a temporary file and no marker. Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from ..errors import CheckpointWriteError

MARKER_FORMAT = "vit-accel-checkpoint-complete"


# ---------------------------------------------------------------------------------------
# Files: atomic writes, fsync, markers
# ---------------------------------------------------------------------------------------

def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".%s.tmp%d" % (path.name, os.getpid()))
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` (written by a library that does not), then the folders."""
    for root, _, files in os.walk(str(folder)):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def marker_path(ckpt: Path) -> Path:
    return Path(ckpt).with_suffix(".done")


def checkpoint_files(ckpt: Path) -> Dict[str, int]:
    """Every file of a checkpoint (the .pt and, under DeepSpeed, the .ds folder) -> size in bytes."""
    ckpt = Path(ckpt)
    out = {ckpt.name: ckpt.stat().st_size}
    side = ckpt.with_suffix(".ds")
    if side.is_dir():
        for root, _, files in os.walk(str(side)):
            for name in files:
                p = Path(root) / name
                out[str(p.relative_to(ckpt.parent))] = p.stat().st_size
    return out


def write_marker(ckpt: Path, info: Dict[str, Any]) -> Path:
    """Declare ``ckpt`` complete (call once every part is durable): its files, sizes and ``info``."""
    ckpt = Path(ckpt)
    record = dict(info, format=MARKER_FORMAT, files=checkpoint_files(ckpt), time=round(time.time(), 3))
    path = marker_path(ckpt)
    tmp = path.with_name(".%s.tmp%d" % (path.name, os.getpid()))
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def read_marker(ckpt: Path) -> Optional[Dict[str, Any]]:
    """The marker of ``ckpt`` if the checkpoint is complete: marker present and every file listed
    there on disk with its size; else None."""
    ckpt = Path(ckpt)
    try:
        record = json.loads(marker_path(ckpt).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != MARKER_FORMAT:
        return None
    for rel, size in (record.get("files") or {}).items():
        p = ckpt.parent / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    return record


# ---------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------

def snapshot(obj: Any, buffers: Optional[Dict[Any, torch.Tensor]] = None) -> Any:
    """A copy of ``obj`` whose tensors are on the host and owned by it: training may go on
    changing the originals while the copy is written. ``buffers`` (by position in ``obj``) are
    reused when shape and dtype match: the pages of a 1 GB state are touched once, not per save."""
    pending: List[torch.Tensor] = []
    buffers = {} if buffers is None else buffers

    def copy(x: Any, where: Any) -> Any:
        if isinstance(x, torch.Tensor):
            out = buffers.get(where)
            if out is None or out.shape != x.shape or out.dtype != x.dtype:
                out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
                buffers[where] = out
            out.copy_(x.detach(), non_blocking=x.is_cuda)
            if x.is_cuda:
                pending.append(out)
            return out
        if isinstance(x, dict):
            return {k: copy(v, where + (k,)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v, where + (i,)) for i, v in enumerate(x))
        return x

    out = copy(obj, ())
    if pending:
        torch.cuda.synchronize()
    return out


class CheckpointWriter:
    """Writes the files of checkpoints: at once (default), or from a host snapshot in a background
    thread that runs the writes and what follows them (``then``) in order."""

    def __init__(self, asynchronous: bool = False):
        self.asynchronous = asynchronous
        self._pool = None  # type: Any
        self._pending = []  # type: List[Any]
        self._error = None  # type: Optional[BaseException]
        self._buffers = {}  # type: Dict[Any, torch.Tensor]
        self.stall_seconds = 0.0  # time the training thread spent in write() and wait(), summed

    def write(self, payload: Any, path: Path) -> None:
        """Write ``payload`` to ``path`` atomically (asynchronous: once the previous save is done)."""
        t0 = time.perf_counter()
        if not self.asynchronous:
            try:
                atomic_save(payload, path)
            except (OSError, RuntimeError) as e:   # torch.save's zip writer reports a failed write as RuntimeError
                raise CheckpointWriteError("checkpoint %s could not be written (%s); the previous complete "
                                           "checkpoint is intact" % (path, e)) from e
        else:
            self.wait()   # the next save waits for the previous one
            data = snapshot(payload, self._buffers)
            self._submit(lambda: atomic_save(data, path))
        self.stall_seconds += time.perf_counter() - t0

    def then(self, job: Callable[[], None]) -> None:
        """Run ``job`` once the files written before it are on disk (the marker); not after a failed write."""
        if self.asynchronous:
            self._submit(job)
        else:
            job()

    def _submit(self, job: Callable[[], None]) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vit-accel-checkpoint")
        self._pending.append(self._pool.submit(self._run, job))

    def _run(self, job: Callable[[], None]) -> None:
        if self._error is not None:   # a write before it failed: its checkpoint must not be marked complete
            return
        try:
            job()
        except BaseException as e:  # reported on the training thread at the next save or at the end
            self._error = e

    def wait(self) -> None:
        """Block until the background writes are done; CheckpointWriteError if one failed."""
        t0 = time.perf_counter()
        for future in self._pending:
            future.result()
        self._pending = []
        self.stall_seconds += time.perf_counter() - t0
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointWriteError("a checkpoint could not be written (%s: %s); the previous complete "
                                       "checkpoint is intact" % (type(e).__name__, e)) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


_SYNC = CheckpointWriter()
_CURRENT = [_SYNC]


def current_writer() -> CheckpointWriter:
    """The writer backends hand their checkpoint files to (see ``writing``)."""
    return _CURRENT[-1]


@contextmanager
def writing(asynchronous: bool) -> Iterator[CheckpointWriter]:
    """Checkpoints written inside go through one writer; leaving waits for its last write."""
    writer = CheckpointWriter(asynchronous)
    _CURRENT.append(writer)
    failed = False
    try:
        yield writer
    except BaseException:
        failed = True
        raise
    finally:
        _CURRENT.remove(writer)
        try:
            writer.close()
        except CheckpointWriteError:
            if not failed:   # the run's own error, if any, is the one to report
                raise
