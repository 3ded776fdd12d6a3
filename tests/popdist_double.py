"""TEST DOUBLE of popdist, PopRun's Python side -- not popdist.

Tests put this module in ``sys.modules["popdist"]`` (and its ``poptorch`` attribute in
``sys.modules["popdist.poptorch"]``), beside tests/poptorch_double.py, so that the IPU
backend's poprun code runs in several local processes. It follows /work/shared/reference/
poptorch.md section 7: poprun starts the instances through MPI, so the instance index and
count are OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE (what ``poptorch.Options.Distributed``
reads); replicas are split evenly over instances; ``popdist.poptorch.Options(ipus_per_replica)``
is a ``poptorch.Options`` with the local replicas and the process id already set (callers
must not call ``replicationFactor``). The reference marks popdist's own internals as
unverified, so the two settings poprun's command line carries are read from variables named
by this double: POPDIST_NUM_TOTAL_REPLICAS (--num-replicas) and POPDIST_NUM_IPUS_PER_REPLICA
(--ipus-per-replica).
"""
from __future__ import annotations

import os
import types

import poptorch_double

TEST_DOUBLE = True
initialised = []                      # one entry per init() call, for tests


def isPopdistEnvSet():
    return "POPDIST_NUM_TOTAL_REPLICAS" in os.environ


def init():
    initialised.append(getInstanceIndex())


def getInstanceIndex():
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", 0))


def getNumInstances():
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))


def getNumTotalReplicas():
    return int(os.environ["POPDIST_NUM_TOTAL_REPLICAS"])


def getNumLocalReplicas():
    total, instances = getNumTotalReplicas(), getNumInstances()
    if total % instances:
        raise RuntimeError(f"--num-replicas {total} is not divisible by --num-instances {instances}")
    return total // instances


def getReplicaIndexOffset():
    return getInstanceIndex() * getNumLocalReplicas()


def getNumIpusPerReplica():
    return int(os.environ.get("POPDIST_NUM_IPUS_PER_REPLICA", 1))


def _options(ipus_per_replica=None):
    if ipus_per_replica is not None and ipus_per_replica != getNumIpusPerReplica():
        raise RuntimeError(f"ipus_per_replica={ipus_per_replica} but poprun was started with "
                           f"--ipus-per-replica {getNumIpusPerReplica()}")
    opts = poptorch_double.Options()
    opts.replicationFactor(getNumLocalReplicas())
    opts.Distributed.configureProcessId(getInstanceIndex(), getNumInstances())
    return opts


poptorch = types.SimpleNamespace(Options=_options)
