"""Leaving the host process group right after a collective never hangs.

Under torch 2.0.1 (the IPU environment) a gloo worker thread frees a collective's tensors after
the caller's wait() returns; if it held the last reference to a tensor Python created, the free
takes the GIL, and ``destroy_process_group`` joins those threads holding the GIL: a deadlock
that once left a poprun instance running forever. ``engine/distributed.py`` keeps the latest
collectives' tensors until the group is left. Here 2 processes join, gather, reduce, broadcast
and leave a gloo group many times over; the race is narrow, so it takes many rounds to meet.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 60

WORKER = r"""
import sys, torch, torch.distributed as dist
from vit_accel.engine import distributed
rank, world, root, rounds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for i in range(rounds):
    dist.init_process_group("gloo", init_method="file://%s/rdv%d" % (root, i), rank=rank, world_size=world)
    got = distributed.all_gather_object({"rank": rank, "round": i, "pad": "x" * (rank * 37 + i)})
    assert [g["rank"] for g in got] == list(range(world)) and all(g["round"] == i for g in got), got
    assert distributed.broadcast_object(("from", rank, i)) == ("from", 0, i)
    s = distributed.all_reduce_sum(torch.tensor([float(rank + 1)], dtype=torch.float64))
    assert s.item() == world * (world + 1) / 2, s
    distributed.all_gather_object(i)          # the last collective before leaving: the race
    distributed.leave_process_group()
print("rounds", rounds)
"""


@pytest.mark.slow
def test_two_processes_leave_the_group_after_collectives_every_time(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    logs = [open(tmp_path / ("rank%d.log" % r), "w+") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), "2", str(tmp_path), str(ROUNDS)],
                              env=env, stdout=logs[r], stderr=subprocess.STDOUT) for r in range(2)]
    try:
        for p in procs:
            p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a process did not leave the group within 120 s (the destroy deadlock)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        log.seek(0)
        out = log.read()
        assert p.returncode == 0 and ("rounds %d" % ROUNDS) in out, out[-3000:]


ENDING = r"""
import atexit, sys, torch.distributed as dist
from vit_accel.engine import distributed
atexit.register(lambda: print("finalized", flush=True))
if sys.argv[1] == "group":
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    distributed.leave_process_group()
print("done", flush=True)
distributed.end_process(3)
"""


@pytest.mark.parametrize("group", [True, False])
def test_a_process_that_was_in_a_group_ends_without_finalization(tmp_path, group):
    """`vit-accel` ends through end_process: after a group the interpreter's finalization (where a
    gloo thread still freeing a collective's tensors aborts the process) is skipped; otherwise
    the process exits as usual. Either way the exit code and the printed output arrive."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", ENDING, "group" if group else "alone", str(tmp_path / "rdv")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "done" in p.stdout
    assert ("finalized" in p.stdout) is (not group)


FAILING = r"""
import atexit, sys, torch.distributed as dist
import vit_accel.cli as cli
atexit.register(lambda: print("finalized", flush=True))

def main(argv=None):
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    raise RuntimeError("a defect inside a command")

cli.main = main
cli.entry()
"""


def test_an_exception_escaping_the_command_still_ends_through_end_process(tmp_path):
    """`vit-accel` (cli.entry): a traceback and exit code 1, and, after a process group, no
    interpreter finalization (the gloo abort end_process avoids)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", FAILING, str(tmp_path / "rdv")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "RuntimeError: a defect inside a command" in p.stderr and "Traceback" in p.stderr
    assert "finalized" not in p.stdout
