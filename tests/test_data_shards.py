"""make-shards sources, manifests, re-runs, foreign shards, webdataset compatibility, digits, bench-data."""
import argparse
import io
import json
import multiprocessing
import os
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from vit_accel.data import (DataError, add_bench_data_parser, add_make_shards_parser, ensure_digits, read_manifest,
                            resolve_shards, verify_manifest)
from vit_accel.data.reader import iter_records
from vit_accel.data import EvalLoader, TrainLoader


def _save(path, seed, fmt="JPEG", size=(36, 28)):
    rng = np.random.RandomState(seed)
    arr = (rng.rand(size[1] // 4, size[0] // 4, 3) * 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).resize(size, Image.BILINEAR).save(path, fmt)


def cli(*argv):
    parser = argparse.ArgumentParser(prog="vit-accel")
    sub = parser.add_subparsers()
    add_make_shards_parser(sub)
    add_bench_data_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def _read_back(manifest):
    """{key: (label, ext, json meta)} of every sample, read with our tar reader."""
    out = {}
    for url in resolve_shards(manifest).urls:
        with tarfile.open(url) as t:
            names = t.getnames()
            for n in names:
                key, ext = n.split(".", 1)
                if ext == "json":
                    meta = json.loads(t.extractfile(n).read())
                    img_ext = next(e for e in ("jpg", "png") if key + "." + e in names)
                    out[key] = (int(t.extractfile(key + ".cls").read()), img_ext, meta)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder with 3 classes: JPEGs, a PNG, a BMP, a truncated JPEG and a text file named .jpg."""
    root = tmp_path_factory.mktemp("imgs")
    for c, cls in enumerate(["cat", "dog", "eel"]):
        for i in range(10):
            _save(str(root / cls / ("%s_%d.jpg" % (cls, i))), c * 100 + i)
    _save(str(root / "dog" / "extra.png"), 7, "PNG")
    _save(str(root / "eel" / "bitmap.bmp"), 8, "BMP")
    good = (root / "cat" / "cat_0.jpg").read_bytes()
    (root / "cat" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (root / "eel" / "notes.jpg").write_text("not an image")
    return root


def test_imagefolder_round_trip_and_write_time_skips(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("make-shards", "--input", folder, "--val-fraction", 0,
               "--output", out, "--samples-per-shard", 8, "--workers", 2) == 0
    m = read_manifest(str(out / "train.json"))
    assert m["classes"] == ["cat", "dog", "eel"] and m["num_samples"] == 32
    assert [s["name"] for s in m["shards"]] == ["train-%06d.tar" % i for i in range(5)]  # 34 sources -> 5 shards
    assert sum(s["samples"] for s in m["shards"]) == 32 and max(s["samples"] for s in m["shards"]) <= 7
    assert sorted(s["source"] for s in m["skipped"]) == ["cat/broken.jpg", "eel/notes.jpg"]
    samples = _read_back(str(out / "train.json"))
    # keys are the path below the folder: a key in a report leads back to its file
    assert samples["dog_extra"][:2] == (1, "png") and samples["eel_bitmap"][:2] == (2, "png")  # BMP stored as PNG
    assert samples["cat_cat_3"] == (0, "jpg", {"class": "cat", "label": 0, "source": "cat/cat_3.jpg"})
    raw = (folder / "cat" / "cat_3.jpg").read_bytes()
    found = [r for u in resolve_shards(str(out)).urls for _, r in iter_records(u) if r.key == "cat_cat_3"]
    assert found[0].files["jpg"] == raw  # JPEGs pass through byte for byte when not resized
    assert "32 samples, 2 skipped" in capsys.readouterr().out


def test_webdataset_library_reads_our_shards(folder, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    cli("make-shards", "--input", folder, "--val-fraction", 0,
        "--output", out, "--samples-per-shard", 8, "--workers", 1)
    urls = resolve_shards(str(out / "train.json")).urls
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("__key__", "jpg;png",
                                                                                          "cls", "json")
    rows = list(ds)
    assert len(rows) == 32
    for key, img, cls, meta in rows:
        assert img.size == (36, 28) and cls == meta["label"]
        assert key.startswith(meta["class"] + "_")


def test_rerun_skips_valid_shards_and_rewrites_changed_ones(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("make-shards", "--input", folder, "--val-fraction", 0,
            "--output", out, "--samples-per-shard", 10, "--workers", 1)
    cli(*args)
    first = read_manifest(str(out / "train.json"))
    capsys.readouterr()
    cli(*args)
    assert "4 shards reused" in capsys.readouterr().out
    assert read_manifest(str(out / "train.json"))["skipped"] == first["skipped"] and len(first["skipped"]) == 2
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    assert verify_manifest(str(out / "train.json")) == ["%s: sha256 differs from the manifest (file changed or "
                                                        "corrupt)" % shard]
    cli(*args)
    log = capsys.readouterr().out
    assert "train-000001.tar: sha256 did not match the manifest; rewritten" in log and "3 shards reused" in log
    assert read_manifest(str(out / "train.json"))["shards"] == first["shards"]  # deterministic bytes
    assert verify_manifest(str(out / "train.json")) == []
    # A different plan (resize) rewrites everything and drops the stale extra shards.
    cli("make-shards", "--input", folder, "--val-fraction", 0,
        "--output", out, "--samples-per-shard", 20, "--resize", 14)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-000001.tar", "train.json"]
    img = Image.open(io.BytesIO(next(r for _, r in iter_records(str(out / "train-000000.tar"))).files["jpg"]))
    assert min(img.size) == 14


def test_interrupted_manifest_is_refused_with_the_fix(folder, tmp_path):
    out = tmp_path / "out"
    cli("make-shards", "--input", folder, "--val-fraction", 0,
        "--output", out, "--samples-per-shard", 10, "--workers", 1)
    m = json.loads((out / "train.json").read_text())
    m["complete"] = False
    (out / "train.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="incomplete.*re-run the same make-shards"):
        resolve_shards(str(out / "train.json"))


def test_csv_and_tsv_sources(folder, tmp_path):
    lines = ["path,label"] + ["%s/%s_%d.jpg,%s" % (c, c, i, c.upper()) for c in ("cat", "eel") for i in range(3)]
    (folder / "list.csv").write_text("\n".join(lines) + "\n")
    cli("make-shards", "--source", "csv", "--input", folder / "list.csv", "--output", tmp_path / "a", "--name", "x")
    m = read_manifest(str(tmp_path / "a" / "x.json"))
    assert m["classes"] == ["CAT", "EEL"] and m["num_samples"] == 6
    assert {k: v[0] for k, v in _read_back(str(tmp_path / "a" / "x.json")).items()} == {
        "cat_0": 0, "cat_1": 0, "cat_2": 0, "eel_0": 1, "eel_1": 1, "eel_2": 1}
    (folder / "list.tsv").write_text("dog/dog_1.jpg\t4\ndog/dog_2.jpg\t1\n")
    cli("make-shards", "--source", "csv", "--input", folder / "list.tsv", "--output", tmp_path / "b")
    assert read_manifest(str(tmp_path / "b" / "train.json"))["num_classes"] == 5  # integer labels: 0..max
    assert {k: v[0] for k, v in _read_back(str(tmp_path / "b" / "train.json")).items()} == {"dog_1": 4, "dog_2": 1}


@pytest.mark.parametrize("style", ["loc_csv", "lines_wnid", "lines_index"])
def test_imagenet_layout(tmp_path, style):
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    for c, w in enumerate(wnids):
        for i in range(2):
            _save(str(root / "train" / w / ("%s_%d.JPEG" % (w, i))), c * 10 + i)
    truth = {"ILSVRC2012_val_%08d" % (i + 1): i % 3 for i in range(5)}
    for stem in truth:
        _save(str(root / "val" / (stem + ".JPEG")), 50 + int(stem[-1]))
    labels = tmp_path / "labels.txt"
    if style == "loc_csv":
        labels.write_text("ImageId,PredictionString\n" + "".join(
            "%s,%s 1 2 30 40 %s 5 6 7 8\n" % (s, wnids[c], wnids[c]) for s, c in truth.items()))
    elif style == "lines_wnid":
        labels.write_text("".join("%s.JPEG %s\n" % (s, wnids[c]) for s, c in truth.items()))
    else:
        labels.write_text("".join("%s.JPEG %d\n" % (s, c) for s, c in truth.items()))
    assert cli("make-shards", "--source", "imagenet", "--input", root, "--output", tmp_path / "s") == 0
    assert cli("make-shards", "--source", "imagenet", "--input", root, "--split", "val", "--imagenet-val-labels",
               labels, "--output", tmp_path / "s") == 0
    train, val = (read_manifest(str(tmp_path / "s" / n)) for n in ("train.json", "val.json"))
    assert train["classes"] == val["classes"] == wnids and train["num_samples"] == 6
    assert {k: v[0] for k, v in _read_back(str(tmp_path / "s" / "val.json")).items()} == truth


def test_bad_inputs_print_one_line_and_return_2(tmp_path, capsys):
    assert cli("make-shards", "--input", tmp_path / "nowhere", "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err
    (tmp_path / "val").mkdir()
    assert cli("make-shards", "--source", "imagenet", "--split", "val", "--input", tmp_path, "--output",
               tmp_path / "o") == 2
    assert "--imagenet-val-labels" in capsys.readouterr().err
    assert cli("bench-data", "--shards", tmp_path / "none.json") == 2
    assert "does not exist" in capsys.readouterr().err


def test_shard_bytes_target(folder, tmp_path):
    cli("make-shards", "--input", folder, "--val-fraction", 0,
        "--output", tmp_path, "--shard-bytes", "12KB", "--workers", 1)
    m = read_manifest(str(tmp_path / "train.json"))
    assert len(m["shards"]) > 2 and all(s["bytes"] < 2 * 12 * 1024 for s in m["shards"])


def test_foreign_shards_and_spec_forms(tmp_path):
    """A plain tar of KEY.jpg + KEY.cls (no manifest) reads; counts come from a header scan."""
    d = tmp_path / "foreign"
    d.mkdir()
    for s in range(2):
        with tarfile.open(str(d / ("part%d.tar" % s)), "w") as t:
            for i in range(7 + s):
                buf = io.BytesIO()
                Image.new("RGB", (20, 18), (i * 20, s * 90, 7)).save(buf, "JPEG")
                for name, data in (("img%d_%d.jpg" % (s, i), buf.getvalue()), ("img%d_%d.cls" % (s, i), b"1"),
                                   ("._img%d_%d.jpg" % (s, i), b"macOS resource fork")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    for spec in (str(d), str(d / "part{0..1}.tar"), "file://" + str(d / "part{0,1}.tar")):
        shards = resolve_shards(spec)
        assert shards.counts == [7, 8] and shards.classes is None
    assert resolve_shards("pipe:cat " + str(d / "part{0..1}.tar")).counts == [7, 8]  # streamed once to count
    loader = TrainLoader(resolve_shards("pipe:cat " + str(d / "part{0..1}.tar")), 16, 5, 0, workers=2,
                         return_keys=True)
    it = iter(loader)
    keys = [k for _ in range(loader.batches_per_epoch) for k in next(it)[2]]
    # a batch of 5 takes one stream (data.streams auto: 1) of both shards: every sample once per epoch
    assert len(set(keys)) == len(keys) == 15 and all(k.startswith("img") for k in keys)
    keys = [k for _, _, ks in EvalLoader(resolve_shards(str(d)), 16, 4, return_keys=True) for k in ks]
    assert sorted(keys) == sorted(["img0_%d" % i for i in range(7)] + ["img1_%d" % i for i in range(8)])


def test_manifest_beside_a_pattern_and_base_for_remote(folder, tmp_path):
    out = tmp_path / "out"
    cli("make-shards", "--input", folder, "--val-fraction", 0,
        "--output", out, "--samples-per-shard", 10, "--workers", 1)
    m = read_manifest(str(out / "train.json"))
    part = resolve_shards(str(out / "train-{000001..000002}.tar"))
    # a manifest the user did not name gives the counts of the files named, nothing else
    assert part.counts == [s["samples"] for s in m["shards"][1:3]] and part.classes is None
    assert part.urls == [str(out / "train-000001.tar"), str(out / "train-000002.tar")]
    # Object storage: the manifest stays local and names where the bytes live.
    m["base"] = "pipe:cat %s/{name}" % out
    (tmp_path / "remote.json").write_text(json.dumps(m))
    remote = resolve_shards(str(tmp_path / "remote.json"))
    assert remote.urls[0] == "pipe:cat %s/train-000000.tar" % out
    keys = [k for _, _, ks in EvalLoader(remote, 16, 8, return_keys=True) for k in ks]
    assert len(keys) == 32
    with pytest.raises(DataError, match="several manifests"):
        (out / "other.json").write_text((out / "train.json").read_text())
        resolve_shards(str(out))


def _ensure_in_process(root):
    return ensure_digits(root)


def test_digits_written_once_counts_and_concurrent_calls(tmp_path):
    root = str(tmp_path / "data")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:  # two "ranks" racing on the first use
        results = pool.map(_ensure_in_process, [root, root])
    assert results[0] == results[1] and results[0][2] == 10
    train, val, _ = results[0]
    t, v = read_manifest(train), read_manifest(val)
    assert (t["num_samples"], v["num_samples"]) == (1437, 360)
    assert [s["samples"] for s in t["shards"]] == [359, 359, 359, 360] and len(v["shards"]) == 2
    assert sorted(os.listdir(os.path.dirname(train))) == sorted(
        ["train.json", "val.json"] + ["train-%06d.tar" % i for i in range(4)] + ["val-%06d.tar" % i for i in range(2)])
    assert [n for n in os.listdir(root) if n != "digits"] == []  # no temp folders left behind
    stamp = os.path.getmtime(train)
    start = time.time()
    assert ensure_digits(root) == results[0]
    assert time.time() - start < 2.0 and os.path.getmtime(train) == stamp  # verified, not rewritten
    rec = next(r for _, r in iter_records(resolve_shards(train).urls[0]))
    img = Image.open(io.BytesIO(rec.files["png"]))
    assert img.size == (32, 32) and img.mode == "L" and 0 <= int(rec.files["cls"]) < 10
    # Damage a shard: the next call notices and rebuilds.
    with open(resolve_shards(val).urls[1], "r+b") as f:
        f.seek(700)
        f.write(b"\x00garbage")
    assert ensure_digits(root) == results[0] and verify_manifest(val) == []


def test_digits_arrays_are_load_digits_read_from_scikit_learns_file(monkeypatch):
    import importlib.util

    from sklearn.datasets import load_digits

    from vit_accel.data import digits

    ref = load_digits()
    images, target = digits.digits_arrays()
    assert images.dtype == ref.images.dtype and np.array_equal(images, ref.images)
    assert np.array_equal(target, ref.target) and target.dtype.kind == "i"
    # where the file is not where it was (another layout): load_digits itself, the same arrays
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    images, target = digits.digits_arrays()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)


def test_bench_data_runs_and_reports_a_ratio(folder, tmp_path, capsys):
    out = tmp_path / "out"
    cli("make-shards", "--input", folder, "--val-fraction", 0,
        "--output", out, "--samples-per-shard", 16, "--workers", 1)
    capsys.readouterr()
    assert cli("bench-data", "--shards", out / "train.json", "--workers", 0, "--batch-size", 8, "--img-size", 16) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "ratio" in lines[1] and lines[2].split()[0] == "0" and lines[2].endswith("x")
