"""Small helpers several test files share."""
import contextlib
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def randomize(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Add N(0, std) to every parameter (LayerNorm scales stay near 1, biases and the zeroed head
    move), so a swapped or dropped tensor shows in the outputs; returns the model in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_folder(tmp_path_factory) -> Path:
    """The test session's temporary folder, one for every pytest-xdist worker (each worker's own
    folder, popen-gwN, lies in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def session_lock(tmp_path_factory, name: str) -> Iterator[Path]:
    """Hold the session-wide lock NAME (every xdist worker's tests queue on it); yields the folder
    the session's shared things live in."""
    folder = _session_folder(tmp_path_factory)
    with open(folder / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def made_once(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> Any:
    """make(folder) once per test session, whichever xdist worker asks first; the others wait and get
    its folder and its result (JSON: paths as strings) instead of launching the same runs again. A
    module fixture alone runs once per worker that runs one of the module's tests. A `make` that
    raises (a failure, a skip) leaves nothing behind: the next asker tries again and says why itself."""
    with session_lock(tmp_path_factory, name) as shared:
        folder, done = shared / name, shared / f"{name}.json"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(make(folder)))
        return json.loads(done.read_text())
