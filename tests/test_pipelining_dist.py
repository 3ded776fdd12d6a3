"""The IPU stage plan driving torch.distributed.pipelining: 2 CPU processes (gloo), one stage
each; one training step's loss and updated weights equal the unpipelined step's.

The workers are this file run as a script (`python tests/test_pipelining_dist.py RANK ...`),
so nothing depends on how pytest imports test modules.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from testkit import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEDULES = ("gpipe", "1f1b")


def make_model():
    from vit_accel.model import create_vit

    torch.manual_seed(0)
    m = create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5, attn_impl="eager")
    torch.nn.init.normal_(m.head.weight, std=0.1)     # a zero head gives zero gradients upstream
    return m


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)


def make_plan():
    from vit_accel.backends.pipeline import plan_from_starts

    return plan_from_starts(["patch_embed", "blocks.2"], depth=4, num_devices=2)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from vit_accel.backends.pipeline_run import run_pipelined

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    plan = make_plan()
    x, y = make_batch()
    for schedule in SCHEDULES:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loss = run_pipelined(model, plan, x, y, optimizer=opt, schedule=schedule, micro_batches=4,
                             loss_fn=lambda logits, t: F.cross_entropy(logits, t))
        mine = {k: v for k, v in model.state_dict().items() if plan.stage_of_param(k).index == rank}
        torch.save({"loss": loss, "weights": mine}, os.path.join(out_dir, f"{schedule}-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_stage_pipeline_step_equals_plain_step(tmp_path):
    pytest.importorskip("torch.distributed.pipelining")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)

    ref = make_model()
    x, y = make_batch()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    opt.step()
    expected = ref.state_dict()
    for schedule in SCHEDULES:
        got = {}
        for r in range(2):
            res = torch.load(tmp_path / f"{schedule}-{r}.pt", weights_only=False)
            assert res["loss"] == pytest.approx(loss.item(), abs=1e-5), schedule
            got.update(res["weights"])
        assert set(got) == set(expected)
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=f"{schedule}: {k}")
        assert not torch.equal(got["blocks.0.attn.qkv.weight"], make_model().blocks[0].attn.qkv.weight)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
