"""Resume on the IPU path (against tests/poptorch_double.py): the device RNG restarts every
call from (seed, step) through ``PoplarExecutor.rng_state``, and the learning rate the
backend remembers is forgotten on resume, so the first step after it writes and pushes its own.
"""
import sys

import pytest
import torch

import poptorch_double
from test_ipu import SMALL, batch
from vit_accel.backends.ipu import IPUBackend, device_seed
from vit_accel.config import load_recipe
from vit_accel.model import create_vit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def double(monkeypatch):
    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    monkeypatch.delenv("POPTORCH_IPU_MODEL", raising=False)
    return poptorch_double


def backend_with_dropout(drop=0.3):
    r = load_recipe("vit-ti-digits", SMALL + [f"model.drop_rate={drop}"])
    b = IPUBackend(r)
    torch.manual_seed(0)
    m = create_vit("vit-ti16", img_size=16, patch_size=8, depth=4, num_classes=5, drop_rate=drop,
                   **b.model_options())
    torch.nn.init.normal_(m.head.weight, std=0.1)
    b.setup(m)
    return r, b


BATCHES = [batch(16) for _ in range(3)]


def run(b, steps, lr=0.05):
    for i in steps:
        torch.manual_seed(1000 + 17 * i)     # host RNG as the trainer leaves it: the device ignores it
        b.train_step(*BATCHES[i], lr=lr)


def test_device_rng_is_seeded_from_seed_and_step(double):
    r, b = backend_with_dropout()
    run(b, range(3))
    assert b.train_model.rng_seeds == [device_seed(r.train.seed, s) for s in range(3)]
    assert len(set(b.train_model.rng_seeds)) == 3
    assert b.train_model.rng_state[0] == device_seed(r.train.seed, 2)


def test_resume_draws_the_dropout_masks_of_an_uninterrupted_run(double, tmp_path):
    _, whole = backend_with_dropout()
    run(whole, range(3))

    _, first = backend_with_dropout()
    run(first, range(2))
    path = first.save_state(tmp_path / "step_2.pt", {"step": 2})

    _, resumed = backend_with_dropout()
    assert resumed.load_state(path)["step"] == 2
    run(resumed, [2])
    assert resumed.train_model.rng_seeds == [device_seed(42, 2)]
    want = whole.model_state_dict()
    for k, v in resumed.model_state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)

    _, unseeded = backend_with_dropout()              # the same resume with the seed of step 0:
    unseeded.load_state(path)
    unseeded._step = 0                                # other masks, other weights (dropout is live)
    run(unseeded, [2])
    assert not torch.equal(unseeded.model_state_dict()["blocks.0.mlp.fc1.weight"], want["blocks.0.mlp.fc1.weight"])


def test_resume_forgets_the_cached_learning_rate(double, tmp_path):
    r, a = backend_with_dropout(0.0)
    run(a, [0], lr=0.05)
    run(a, [1], lr=0.01)
    path = a.save_state(tmp_path / "step_2.pt", {"step": 2})

    recipe_lr = r.optim.lr
    _, b = backend_with_dropout(0.0)                  # not compiled yet: the compile reads the lr
    b.load_state(path)
    assert all(g["lr"] == 0.01 for g in b.optimizer.param_groups)        # the checkpoint's
    run(b, [2], lr=recipe_lr)                         # the value setup() cached: must still be written
    assert all(g["lr"] == recipe_lr for g in b.optimizer.param_groups)

    _, c = backend_with_dropout(0.0)                  # compiled before the resume: the lr is pushed
    run(c, [0], lr=0.05)
    c.load_state(path)
    run(c, [2], lr=0.05)
    assert c.train_model.optimizer_pushes == [[0.05, 0.05]]
    assert all(g["lr"] == 0.05 for g in c.optimizer.param_groups)
