"""The photo corpus and `vit-accel bench-data`: real library baselines, one JSON row per pipeline x workers."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from vit_accel.cli import main
from vit_accel.data.bench import PIPELINES, ROW_KEYS
from vit_accel.data.corpus import corpus_images, sample_photos, write_photo_corpus

pytest.importorskip("torchvision", reason="the baselines are torchvision's and timm's own pipelines")
pytest.importorskip("timm", reason="the baselines are torchvision's and timm's own pipelines")


@pytest.fixture(scope="module")
def photos():
    return sample_photos()


def test_corpus_is_imagenet_like_photographs_and_deterministic(photos):
    a = corpus_images(6, photos=photos)
    assert a == corpus_images(6, photos=photos) and len(set(a)) == 6
    assert a != corpus_images(6, seed=1, photos=photos)
    for data in a:
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size in ((500, 375), (375, 500))
        assert img.layer == [(1, 2, 2, 0), (2, 1, 1, 1), (3, 1, 1, 1)]  # 4:2:0 chroma subsampling
        # quality 90: PIL's estimate from the quantization tables
        q = img.quantization[0]
        assert 2 <= q[0] <= 4 and 20_000 < len(data) < 150_000
        arr = np.asarray(img.convert("L"), np.float32)
        # photographic: smooth almost everywhere, edges somewhere; noise or flat colour fails one of them
        grad = np.abs(np.diff(arr, axis=1))
        assert np.median(grad) < 6 and np.percentile(grad, 99) > 20 and arr.std() > 20


def test_bench_data_times_ours_and_the_libraries_and_writes_rows(tmp_path, capsys):
    corpus = tmp_path / "photos"
    write_photo_corpus(str(corpus), 48, classes=3)
    out = tmp_path / "rows.json"
    argv = ["bench-data", "--images", str(corpus), "--workers", "0", "--batch-size", "8", "--img-size", "32",
            "--pipelines", "train", "train-vs-timm", "eval", "gpu-decode", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("bench-data: 48 images") and "load average" in lines[0]
    from vit_accel.data import jpeg_region

    why = jpeg_region.unavailable()  # the decoder that ran, and why not the partial one where it did not
    assert lines[0].endswith("our decoder libjpeg, only each crop's rows and columns" if not why else
                             "(whole images; the partial decoder: %s)" % why), lines[0]
    assert lines[1].split()[-1] == "ratio"
    rows = json.loads(out.read_text())
    assert [r["pipeline"] for r in rows] == ["train", "train-vs-timm", "eval", "gpu-decode"]
    for r, line in zip(rows, lines[2:6]):
        assert tuple(r) == ROW_KEYS and r["workers"] == 0 and r["baseline"] == PIPELINES[r["pipeline"]][1]
        assert all(r[k] > 0 for k in ROW_KEYS[2:4] + ROW_KEYS[5:])
        ratio = r["images_per_cpu_second"] / r["baseline_images_per_cpu_second"]
        assert line.split()[:2] == ["0", r["pipeline"]] and line.endswith("%.2fx" % ratio)
    # train-vs-timm reports the same run of ours as train; gpu-decode's baseline is ours on the CPU
    assert rows[0]["images_per_cpu_second"] == rows[1]["images_per_cpu_second"] == rows[3][
        "baseline_images_per_cpu_second"]
    assert "timm ImageDataset + create_transform" in "\n".join(lines[6:])


def test_bench_data_bad_inputs_say_what_to_do(tmp_path, capsys):
    assert main(["bench-data"]) == 2
    assert "give --corpus N, --images DIR or --shards SPEC" in capsys.readouterr().err
    assert main(["bench-data", "--corpus", "5", "--pipelines", "train", "nope"]) == 2
    assert "unknown pipeline(s) nope" in capsys.readouterr().err


def test_cpu_time_of_the_process_tree_counts_live_workers():
    import subprocess
    import sys
    import time

    from vit_accel.data.bench import tree_cpu_seconds

    if tree_cpu_seconds() is None:
        pytest.skip("no /proc here: bench-data counts joined workers instead")
    before = tree_cpu_seconds()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", busy])
    try:
        deadline = time.time() + 30
        while tree_cpu_seconds() - before < 0.4 and time.time() < deadline:
            time.sleep(0.2)
        assert tree_cpu_seconds() - before >= 0.4  # the child's CPU time, while it still runs
    finally:
        child.kill()
        child.wait()
