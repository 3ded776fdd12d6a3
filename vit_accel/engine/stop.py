"""Stopping on a scheduler's signal: finish the step in flight, checkpoint it, exit 75.

A preempted job gets a signal before it is killed (SLURM's ``--signal``, torchrun forwarding
its own SIGTERM). ``train.stop_signals`` (default SIGTERM, SIGUSR1) are caught: the handler only
notes the signal; after each optimizer step the processes agree (one all-reduce) whether any of
them got one, so all stop after the same step, write a checkpoint there, and the command exits
with EXIT_STOPPED (75, EX_TEMPFAIL: try again later). A second signal while the checkpoint is
written is reported and ignored, so the save completes; SIGKILL still kills, and then the
previous complete checkpoint is the newest. Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any, List, Optional

import torch

from ..config import check_stop_signals
from . import distributed

EXIT_STOPPED = 75


class Stopped(Exception):
    """The run stopped on a signal after checkpointing step ``step`` at ``path``."""

    def __init__(self, signal_name: str, step: int, path: Any, run_dir: Any):
        super().__init__("stopped by %s after step %d; checkpoint %s" % (signal_name, step, path))
        self.signal_name, self.step, self.path, self.run_dir = signal_name, step, path, run_dir


class StopSignals:
    """Catches ``names`` while the loop runs (``with``); ``agreed()`` after a step says whether to stop."""

    def __init__(self, names: List[str]):
        check_stop_signals(names)
        self.names = list(names)
        self.received = None  # type: Optional[str]
        self._previous = {}  # type: Dict[int, Any]
        self._sigchld = None  # type: Any

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():   # Python delivers signals there only
            for name in self.names:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._sigchld is not None:
            signal.signal(signal.SIGCHLD, self._sigchld)
        self._previous, self._sigchld = {}, None

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            if hasattr(signal, "SIGCHLD"):
                # A scheduler that signals every process of the job ends the loader's workers too; the
                # DataLoader's SIGCHLD handler would raise in the middle of the checkpoint. No batch is
                # read after this step, so their end no longer matters.
                self._sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            print("vit-accel: %s received: finishing this step, then checkpointing it" % name, file=sys.stderr,
                  flush=True)
        else:
            print("vit-accel: %s received again: ignored, the run stops once this step's checkpoint is written "
                  "(SIGKILL stops at once; the previous complete checkpoint then stays the newest)" % name,
                  file=sys.stderr, flush=True)

    def agreed(self) -> Optional[str]:
        """The signal that stops the run, if any process got one (collective when distributed)."""
        if not distributed.is_distributed():
            return self.received
        got = distributed.all_reduce_sum(torch.tensor([0.0 if self.received is None else 1.0], dtype=torch.float64))
        if got[0].item() == 0:
            return None
        return self.received or "a signal to another process"
