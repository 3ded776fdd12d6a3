"""EMA and layer-wise lr decay across processes: DeepSpeed ZeRO-2 (gloo, CPU) against plain DDP
on the same data, and the one-line refusal under ZeRO-3."""
import json
import subprocess
import sys

import pytest
import torch

from test_zero import E2E, _env, _run, _torchrun, deepspeed_missing

EXTRA = ["--set", "train.ema_momentum=0.5", "--set", "optim.layer_decay=0.75", "--set", "train.checkpoint_every=2"]


@pytest.mark.slow
@pytest.mark.skipif(deepspeed_missing, reason="deepspeed is not installed")
def test_zero2_ema_and_layer_decay_match_ddp(tmp_path):
    runs = {}
    for stage in (-1, 2):
        rd = tmp_path / f"z{stage}"
        _run(_torchrun("-m", "vit_accel", "train", "--backend", "cpu", "--run-dir", rd, *E2E, *EXTRA,
                       "--set", f"data.root={tmp_path / 'data'}", "--set", f"distributed.zero_stage={stage}"),
             cwd=tmp_path, timeout=400)
        runs[stage] = rd
    ema = {s: torch.load(rd / "checkpoints" / "step_0000004.pt", map_location="cpu", weights_only=False)["ema"]
           for s, rd in runs.items()}
    assert ema[-1]["steps"] == ema[2]["steps"] == 4
    worst = max((ema[-1]["params"][k] - ema[2]["params"][k]).abs().max().item() for k in ema[-1]["params"])
    assert worst < 1e-5, worst
    summaries = {s: json.loads((rd / "summary.json").read_text()) for s, rd in runs.items()}
    assert abs(summaries[-1]["ema_val_loss"] - summaries[2]["ema_val_loss"]) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(deepspeed_missing, reason="deepspeed is not installed")
def test_zero3_ema_is_refused_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vit_accel", "train", "--backend", "cpu", "--run-dir", str(tmp_path / "r"),
                        *E2E, *EXTRA, "--set", "distributed.zero_stage=3"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "zero_stage 3" in err[0] and "train.ema_momentum=0" in err[0], p.stderr
