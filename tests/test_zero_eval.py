"""Validation under ZeRO-3 with shards split unevenly over 2 gloo ranks: same forward calls, each sample once."""
import json
from pathlib import Path

import pytest

from digit_tars import write_digit_tars
from test_zero import _run, _torchrun, deepspeed_missing

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(deepspeed_missing, reason="deepspeed is not installed")
def test_zero3_validation_over_uneven_shards(tmp_path):
    # 3 shards over 2 ranks: rank 0 reads shards 0 and 2 (150 samples, 10 batches of 16), rank 1 shard 1 (30, 2)
    spec = write_digit_tars(tmp_path / "val", "val", [50, 30, 100])
    out = tmp_path / "out"
    out.mkdir()
    _run(_torchrun(ROOT / "tests" / "zero_eval_worker.py", "--val", spec, "--out", out), cwd=tmp_path, timeout=400)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["own_samples"], r1["own_samples"]) == (150, 30)
    assert r0["calls"] == r1["calls"] == 10           # the rank out of data keeps pace with blank forwards
    assert sum(r0["images"]) == 150 and sum(n for n in r1["images"][:2]) == 30 and set(r1["images"][2:]) == {1}
    assert r0["val_count"] == r1["val_count"] == 180  # every sample counted once, blanks never
    assert r0["val_loss"] == r1["val_loss"] and r0["val_top1"] == r1["val_top1"]
    # per-class results are collective too: both ranks hold the whole set's counts and mistakes
    for key in ("val_per_class", "val_confusion", "val_mistakes", "val_class_names"):
        assert r0[key] == r1[key], key
    assert sum(map(sum, r0["val_confusion"])) == 180 and sum(p["count"] for p in r0["val_per_class"]) == 180
    assert len(r0["val_mistakes"]) == 10 and r0["val_class_names"] == [str(i) for i in range(10)]
