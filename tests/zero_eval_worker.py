"""One rank of the uneven-validation check: ZeRO-3 evaluation over shards split unevenly.

    torchrun --nproc_per_node 2 tests/zero_eval_worker.py --val SPEC --out DIR
Writes DIR/rank{R}.json: forward calls made and the summed result.
"""
import argparse
import dataclasses
import json
import os

import torch

from vit_accel.backends import create_backend
from vit_accel.config import load_recipe
from vit_accel.data import build_eval_loader
from vit_accel.engine import distributed
from vit_accel.engine.trainer import build_model, evaluate

p = argparse.ArgumentParser()
p.add_argument("--val", required=True)
p.add_argument("--out", required=True)
p.add_argument("--stage", type=int, default=3)
a = p.parse_args()
recipe = load_recipe("vit-ti-digits", ["model.depth=1", "train.global_batch_size=16", "cpu.micro_batch_size=8",
                                       "train.eval_batch_size=16", f"distributed.zero_stage={a.stage}",
                                       "data.source=shards", "model.num_classes=10", "data.workers=0"],
                     backends=["cpu"])
torch.manual_seed(0)
backend = create_backend("cpu", recipe)
backend.setup(build_model(recipe, backend))
calls = []
inner = backend.eval_step
backend.eval_step = lambda images: calls.append(images.shape[0]) or inner(images)
loader = build_eval_loader(dataclasses.replace(recipe.data, val_shards=a.val), recipe.model.img_size, backend.eval_batch_size,
                           rank=distributed.rank(), world_size=distributed.world_size(), return_keys=True)
res = evaluate(backend, recipe, loader, [str(i) for i in range(10)])
with open(os.path.join(a.out, f"rank{distributed.rank()}.json"), "w") as f:
    json.dump({"calls": len(calls), "images": calls, "own_samples": loader.num_samples, **res}, f)
backend.close()
distributed.end_process(0)          # as the `vit-accel` command ends a process that was in a group
