"""Shared pytest setup: the Triton interpreter on machines without CUDA, seeds, temp dirs."""
import os
import sys

# Must be set before any module defining @triton.jit kernels is imported.
try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "build", "torch_extensions"))
# The partial JPEG decoder (vit_accel/data/jpeg_region.py) builds beside them, not in the user's home
os.environ.setdefault("VIT_ACCEL_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build",
                                                      "vit-accel-cache"))
# One ninja for every process that builds DeepSpeed's CPU op into that folder: the environment's
# own (pip's ninja 1.13) first on PATH. Processes started with the system's ninja 1.11 beside it
# read each other's build log as "command line changed" and rebuild the op (30-80 s) in turn.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
# Under pytest-xdist every worker is one of several processes sharing the cores: one intra-op thread
# each (and in the processes its tests start) instead of every worker oversubscribing them all.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device (none present)")


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds sync cost, and on a shared 2-core box
    an oversubscribed pool makes every small op ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_addoption(parser):
    parser.addoption("--one-per-file", action="store_true",
                     help="run only the first test of each file (tools/gpu_check.sh --dry-run)")


# The modules whose tests run many processes (launches, installs, end-to-end runs) and about the CPU
# seconds each takes on two cores: under pytest-xdist they start the workers' shares, so that each
# worker ends on short tests. (worksteal hands each worker a contiguous share of the collected order
# and an idle worker steals from the end of another's; a long test last holds every other core idle.)
HEAVY_MODULES = {"test_zero.py": 80, "test_cluster.py": 65, "test_packaging.py": 50, "test_train_cpu.py": 40,
                 "test_readme.py": 35, "test_gpu_check_script.py": 20}


def heavy_first(items: list, workers: int) -> list:
    """The items in worker shares (as many as the workers, of the sizes worksteal gives): the heavy
    modules spread over the shares, heaviest first to the lightest share, each share's heavy modules
    before its others; every module's items stay in their order."""
    heavy = {name: [i for i in items if i.path.name == name] for name in HEAVY_MODULES}
    shares, load = [[] for _ in range(workers)], [0] * workers
    for name in sorted(HEAVY_MODULES, key=HEAVY_MODULES.get, reverse=True):
        k = load.index(min(load))
        shares[k] += heavy[name]
        load[k] += HEAVY_MODULES[name]
    rest = [i for i in items if i.path.name not in HEAVY_MODULES]
    out = []
    for k, share in enumerate(shares):
        size = (len(items) - len(out)) // (workers - k)   # the share worksteal sends this worker
        take = max(0, size - len(share))
        out += share + rest[:take]
        rest = rest[take:]
    return out + rest


def pytest_collection_modifyitems(config, items):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))   # in each xdist worker (same order in all)
    if workers > 1:
        items[:] = heavy_first(items, workers)
    if not config.getoption("--one-per-file"):
        return
    seen, keep, drop = set(), [], []
    for item in items:
        (drop if item.fspath in seen else keep).append(item)
        seen.add(item.fspath)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
