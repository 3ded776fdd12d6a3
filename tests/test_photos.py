"""Your own photos, end to end: a class folder -> shards with a held-out split -> fine-tune from a small
pretrained file of another class count -> predict by name -> eval --json -> convert to HF and timm,
whose label names are ours; and every bad folder a clear message with nothing lost."""
import json
import tarfile
from pathlib import Path

import pytest
import torch

from photo_folder import CLASSES, write_photos
from vit_accel.cli import main
from vit_accel.data import read_manifest, resolve_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "photos"
    write_photos(root, per_class=24)
    (root / "shapes" / "notes.txt").write_text("not an image by its name: listed, not read")
    (root / "flower" / "broken.jpg").write_bytes((root / "flower" / "flower_000.jpg").read_bytes()[:300])
    return root


def _pretrained(path, num_classes=10, format="vit-accel", **kw):
    """A small "pretrained" file of another class count, with names."""
    from vit_accel.checkpoints import save_checkpoint
    from vit_accel.model import create_vit

    torch.manual_seed(0)
    opts = dict(img_size=32, patch_size=8, depth=1, num_classes=num_classes, pos_embed_std=0.5,
                class_names=[str(i) for i in range(num_classes)] if num_classes else ())
    opts.update(kw)
    return save_checkpoint(create_vit("vit-ti16", **opts), str(path), format)


def _counts(out):
    """{class: (train, val)} from make-shards' per-class table."""
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    return {r[0]: (int(r[1]), int(r[2])) for r in rows if len(r) == 3 and r[1].isdigit() and r[2].isdigit()}


def _val_sources(manifest):
    """{key: source path} of the samples in a manifest's shards."""
    out = {}
    for url in resolve_shards(str(manifest)).urls:
        with tarfile.open(url) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[:-5]] = json.loads(t.extractfile(m).read())["source"]
    return out


@pytest.mark.slow
def test_photo_folder_fine_tune_predict_eval_convert(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 1. shards: a quarter of each class held out, the per-class counts said, the unreadable file named
    assert main(["make-shards", "--input", str(photos), "--output", "shards", "--val-fraction", "0.25",
                 "--samples-per-shard", "16", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "flower/broken.jpg: not a readable image" in out and "shapes/notes.txt" in out
    assert _counts(out) == {"flower": (18, 6), "shapes": (18, 6), "temple": (18, 6), "total": (54, 18)}
    train, val = read_manifest("shards/train.json"), read_manifest("shards/val.json")
    assert train["classes"] == val["classes"] == CLASSES and (train["num_samples"], val["num_samples"]) == (54, 18)
    assert [s["source"] for s in train["skipped"] + val["skipped"]] == ["flower/broken.jpg"]  # recorded, not lost

    # 2. a small pretrained file of another class count (10 named classes; class token: HF has one)
    _pretrained("pretrained.safetensors")

    # 3. fine-tune: variant, resolution and grid from the file; a new 3-class head; the data's names
    assert main(["train", "--backend", "cpu", "--config", "finetune", "--run-dir", "run", "--no-progress",
                 "--set", "model.pretrained=pretrained.safetensors", "--set", "data.train_shards=shards/train.json",
                 "--set", "data.val_shards=shards/val.json", "--set", "data.workers=0", "--set", "optim.lr=1e-2",
                 "--set", "schedule.epochs=6", "--set", "data.scale=[0.35, 1.0]", "--set", "train.global_batch_size=16",
                 "--set", "cpu.micro_batch_size=16", "--set", "train.eval_every=8"]) == 0
    out = capsys.readouterr().out
    assert "classes: 3 (flower, shapes, temple)" in out and "checkpoint has 10 classes, the model 3" in out
    summary = json.loads(Path("run/summary.json").read_text())
    assert summary["val_class_names"] == CLASSES and "val_top3" in summary and "val_top5" not in summary
    assert summary["val_top1"] >= 0.5                                          # chance is 1/3
    assert sum(map(sum, summary["val_confusion"])) == 18
    assert [p["count"] for p in summary["val_per_class"]] == [6, 6, 6]
    vals = [json.loads(x) for x in Path("run/metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [v["step"] for v in vals] == [8, 16, 24] and all("val_confusion" in v for v in vals)
    assert Path("run/confusion.png").stat().st_size > 5_000 and Path("run/curves.png").exists()
    ckpt = "run/checkpoints/step_0000024.pt"

    # 4. predict names the class the model predicts: what eval counted (its mistakes are named by key)
    sources = _val_sources("shards/val.json")
    wrong = {m["key"]: m["predicted"] for m in summary["val_mistakes"]}
    assert len(wrong) == 18 - round(18 * summary["val_top1"])
    keys = sorted(sources)
    assert main(["predict", "--checkpoint", ckpt, "--top", "3"] + [str(photos / sources[k]) for k in keys]) == 0
    lines = capsys.readouterr().out.splitlines()
    for i, key in enumerate(keys):
        block = lines[4 * i:4 * i + 4]
        assert block[0] == str(photos / sources[key])
        assert sorted(row.split()[0] for row in block[1:]) == CLASSES
        assert block[1].split()[0] == wrong.get(key, sources[key].split("/")[0]), (key, block)

    # 5. eval --json: the same numbers, with the class names (from the checkpoint, checked against the manifest)
    assert main(["eval", "--backend", "cpu", "--config", "finetune", "--checkpoint", ckpt, "--json",
                 "--set", "data.val_shards=shards/val.json", "--set", "data.workers=0"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (res["val_top1"], res["val_top3"]) == pytest.approx((summary["val_top1"], summary["val_top3"]))
    for key in ("val_class_names", "val_per_class", "val_confusion", "val_mistakes"):
        assert res[key] == summary[key], key

    # 6. convert: HF id2label and timm label_names are our names; both libraries load the files
    assert main(["convert", ckpt, "hf", "--to", "hf"]) == 0 and main(["convert", ckpt, "timm-dir", "--to", "timm"]) == 0
    assert "3 class names" in capsys.readouterr().out
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.from_pretrained("hf")
    assert [hf.id2label[i] for i in range(3)] == CLASSES and hf.label2id == {c: i for i, c in enumerate(CLASSES)}
    timm = pytest.importorskip("timm")
    tm = timm.create_model("local-dir:timm-dir", pretrained=True).eval()
    assert list(tm.pretrained_cfg["label_names"]) == CLASSES
    from vit_accel.checkpoints import model_from_checkpoint

    ours = model_from_checkpoint(ckpt)[0].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (tm(x) - ours(x)).abs().max() < 1e-5
    for path in ("hf", "timm-dir"):
        assert model_from_checkpoint(path)[0].cfg.class_names == tuple(CLASSES)   # and they read back

    # 7. report: per-class accuracy worst first, the most confident mistakes by key, the confusion redrawn
    Path("run/confusion.png").unlink()
    assert main(["report", "run"]) == 0
    out = capsys.readouterr().out
    assert "top-3" in out and "per class (worst first)" in out and Path("run/confusion.png").exists()
    for m in summary["val_mistakes"]:
        assert f"{m['key']}: {m['class']} -> {m['predicted']}" in out


# ---------------------------------------------------------------------------------------
# make-shards: the two layouts, the split, and every bad folder
# ---------------------------------------------------------------------------------------

def _jpegs(folder, n, start=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", (20, 16), (10 * i % 250, 40, 90)).save(folder / f"img_{i:03d}.jpg")


def _shards(capsys, *argv):
    code = main(["make-shards", "--workers", "1", "--samples-per-shard", "8"] + [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_and_val_folders_are_the_split(tmp_path, capsys):
    for split, n in (("train", 6), ("val", 2)):
        _jpegs(tmp_path / "in" / split / "ant", n)
    _jpegs(tmp_path / "in" / "train" / "bee", 5)
    code, out, _ = _shards(capsys, "--input", tmp_path / "in", "--output", tmp_path / "s")
    assert code == 0 and "the train/ and val/ folders" in out
    assert "no validation images for bee" in out and _counts(out) == {"ant": (6, 2), "bee": (5, 0), "total": (11, 2)}
    train, val = read_manifest(str(tmp_path / "s" / "train.json")), read_manifest(str(tmp_path / "s" / "val.json"))
    assert train["classes"] == val["classes"] == ["ant", "bee"]
    assert (train["num_samples"], val["num_samples"]) == (11, 2)
    assert sorted(_val_sources(tmp_path / "s" / "val.json")) == ["ant_img_000", "ant_img_001"]  # key: the path


def test_a_small_folder_still_gets_a_shard_for_every_loader_process(tmp_path, capsys):
    for name in ("ant", "bee"):
        _jpegs(tmp_path / "in" / name, 72)
    assert main(["make-shards", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "s")]) == 0
    # 130 training images: 8 shards (2 ranks x 4 workers), not one of the 1,000-sample default
    assert len(read_manifest(str(tmp_path / "s" / "train.json"))["shards"]) == 8
    assert len(read_manifest(str(tmp_path / "s" / "val.json"))["shards"]) == 1      # 14: never below 16 a shard


def test_held_out_split_is_per_class_seeded_and_stable(tmp_path, capsys):
    for name, n in (("ant", 20), ("bee", 3), ("cow", 1)):
        _jpegs(tmp_path / "in" / name, n)
    args = ("--input", tmp_path / "in", "--output", tmp_path / "s")
    code, out, _ = _shards(capsys, *args)
    assert code == 0 and "validation held out per class" in out and "one image only, kept for training" in out
    # 10% of each class, at least one where a class can spare it, none from a single image
    assert _counts(out) == {"ant": (18, 2), "bee": (2, 1), "cow": (1, 0), "total": (21, 3)}
    first = _val_sources(tmp_path / "s" / "val.json")
    code, out, _ = _shards(capsys, *args)              # the same draw: every shard is kept
    assert _val_sources(tmp_path / "s" / "val.json") == first and "1 shards reused" in out
    _shards(capsys, *args, "--split-seed", "7", "--output", tmp_path / "s7")
    assert sorted(_val_sources(tmp_path / "s7" / "val.json")) != sorted(first)
    _shards(capsys, *args[:2], "--val-fraction", "0", "--output", tmp_path / "all")
    assert read_manifest(str(tmp_path / "all" / "train.json"))["num_samples"] == 24
    assert not (tmp_path / "all" / "val.json").exists()


@pytest.mark.parametrize("case", ["empty class", "only in val", "single class", "loose images", "extra folder"])
def test_bad_folders_are_refused_with_what_to_move_where(tmp_path, capsys, case):
    root = tmp_path / "in"
    if case == "empty class":
        _jpegs(root / "ant", 3)
        (root / "bee").mkdir()
        (root / "bee" / "IMG_0001.heic").write_bytes(b"\0")
        want = "class folder bee under .*in holds no images .*IMG_0001.heic.* add images .* or remove the folder"
    elif case == "only in val":
        _jpegs(root / "train" / "ant", 3)
        _jpegs(root / "train" / "bee", 3)
        _jpegs(root / "val" / "cow", 1)
        want = "class cow is only in .*val, not in .*train: add its training images"
    elif case == "single class":
        _jpegs(root / "ant", 3)
        want = "has one class folder \\(ant\\): a classifier needs at least two classes"
    elif case == "loose images":
        _jpegs(root / "ant", 3)
        _jpegs(root, 2)
        want = "holds 2 images outside any class folder \\(img_000.jpg, img_001.jpg\\): move them into"
    else:
        _jpegs(root / "train" / "ant", 3)
        _jpegs(root / "train" / "bee", 3)
        _jpegs(root / "test" / "ant", 3)
        want = "holds train/ and also test/: with a train/ folder every class goes under train/<class>/"
    code, out, err = _shards(capsys, "--input", root, "--output", tmp_path / "s")
    import re

    assert code == 2 and re.search(want, err), err
    assert "Traceback" not in err and not (tmp_path / "s").exists()    # refused before anything is written


def test_a_class_whose_images_are_all_unreadable_is_named_and_its_shards_kept(tmp_path, capsys):
    _jpegs(tmp_path / "in" / "ant", 4)
    (tmp_path / "in" / "bee").mkdir()
    for i in range(2):
        (tmp_path / "in" / "bee" / f"b{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code, out, err = _shards(capsys, "--input", tmp_path / "in", "--output", tmp_path / "s")
    assert code == 2 and "class bee has no readable training image" in err
    assert "bee/b0.jpg: not a readable image: no image format PIL knows" in out and "bee/b1.jpg" in out
    assert read_manifest(str(tmp_path / "s" / "train.json"))["num_samples"] == 3   # written; nothing lost


# ---------------------------------------------------------------------------------------
# classes come from the data: num_classes auto, pinned counts checked, labels in the head
# ---------------------------------------------------------------------------------------

def _recipe(*sets, name="vit-ti-digits"):
    from vit_accel.config import load_recipe

    return load_recipe(name, ["data.source=shards"] + list(sets), backends=["cpu"])


@pytest.fixture(scope="module")
def abc_shards(tmp_path_factory):
    """3-class train/val manifests, a 1-class one and a 3-class one in another order."""
    from vit_accel.data import write_shards
    from vit_accel.data.shards import SourceSample
    from PIL import Image
    import io

    d = tmp_path_factory.mktemp("abc")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    samples = [SourceSample("k%d" % i, i % 3, "s%d" % i, data=buf.getvalue()) for i in range(6)]
    for name, classes in (("train", ["a", "b", "c"]), ("val", ["a", "b", "c"]), ("other", ["c", "b", "a"])):
        write_shards(samples, str(d), name, classes, log=lambda m: None)
    write_shards([s._replace(label=0) for s in samples], str(d), "one", ["a"], log=lambda m: None)
    return d


def test_num_classes_auto_takes_the_manifest_and_pinned_counts_must_match(abc_shards):
    from vit_accel.config import ConfigError
    from vit_accel.engine.resolve import resolve_recipe

    d = abc_shards
    r = resolve_recipe(_recipe(f"data.train_shards={d}/train.json", f"data.val_shards={d}/val.json"))
    assert r.recipe.model.num_classes == 3 and r.class_names == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"model.num_classes is 10, but data.train_shards \(.*train.json\) has 3 "
                                          r"classes \(a, b, c\): set model.num_classes=auto"):
        resolve_recipe(_recipe(f"data.train_shards={d}/train.json", "model.num_classes=10"))
    with pytest.raises(ConfigError, match=r"data.val_shards \(.*other.json\) names other classes than data.train_"
                                          r"shards .*\(3: c, b, a vs 3: a, b, c\)"):
        resolve_recipe(_recipe(f"data.train_shards={d}/train.json", f"data.val_shards={d}/other.json"))
    with pytest.raises(ConfigError, match=r"has 1 class \(a\): a classifier needs at least two"):
        resolve_recipe(_recipe(f"data.train_shards={d}/one.json"))
    plain = d / "plain"                                        # tars without their manifest: no class list
    plain.mkdir(exist_ok=True)
    (plain / "t-0.tar").write_bytes((d / "train-000000.tar").read_bytes())
    with pytest.raises(ConfigError, match=r"model.num_classes is auto .* carries no class list .* or set "
                                          r"model.num_classes=N"):
        resolve_recipe(_recipe(f"data.train_shards={plain}/t-{{0..0}}.tar"))
    assert _recipe().model.num_classes == "auto" and _recipe(name="vit-b16-ft").model.num_classes == 1000


def test_labels_outside_the_head_name_both_numbers_and_the_samples():
    from vit_accel.engine.classeval import LabelError, check_labels

    check_labels(torch.tensor([0, 2]), 3)
    with pytest.raises(LabelError, match=r"label 7 in data.val_shards is outside the model's head of 3 classes "
                                         r"\(model.num_classes 3: labels 0..2\); samples: cat_01 \(label 7\)"):
        check_labels(torch.tensor([0, 7, 1]), 3, ["dog_00", "cat_01", "eel_02"], where="data.val_shards")


def test_recipe_keys_for_auto_are_checked():
    from vit_accel.config import ConfigError

    with pytest.raises(ConfigError, match="model.num_classes: expected a number of classes or 'auto'"):
        _recipe("model.num_classes=many")
    with pytest.raises(ConfigError, match="model.name auto takes the architecture from model.pretrained; "
                                          "model.depth 2"):
        _recipe("model.depth=2", name="finetune")
    with pytest.raises(ConfigError, match="model.img_size 0: .* needs model.name auto"):
        _recipe("model.img_size=0")


# ---------------------------------------------------------------------------------------
# model.name auto: the variant, resolution and grid of the pretrained file
# ---------------------------------------------------------------------------------------

def test_finetune_takes_the_files_model_and_resamples_the_grid(abc_shards, tmp_path):
    from vit_accel.config import ConfigError
    from vit_accel.engine.resolve import resolve_recipe
    from vit_accel.engine.trainer import build_model

    d = abc_shards
    pre = _pretrained(tmp_path / "timm.pth", depth=2, format="timm")
    data = [f"data.train_shards={d}/train.json", f"data.val_shards={d}/val.json"]
    r = resolve_recipe(_recipe(f"model.pretrained={pre}", *data, name="finetune"))
    m = r.recipe.model
    assert (m.name, m.patch_size, m.depth, m.img_size, m.num_classes) == ("vit-ti16", 8, 2, 32, 3)
    assert r.pretrained is not None                        # read once, handed to build_model
    model = build_model(r.recipe, class_names=r.class_names, pretrained=r.pretrained, log=lambda s: None)
    assert model.cfg.class_names == ("a", "b", "c")
    assert float(model.head.weight.detach().abs().sum()) == 0.0            # a new head, zero-initialized
    r48 = resolve_recipe(_recipe(f"model.pretrained={pre}", "model.img_size=48", *data, name="finetune"))
    lines = []
    model = build_model(r48.recipe, class_names=r48.class_names, pretrained=r48.pretrained, log=lines.append)
    assert model.cfg.img_size == 48 and "bicubic 4x4 -> 6x6 grid" in lines[0]
    odd = _pretrained(tmp_path / "odd.safetensors", width=96, num_heads=3)
    with pytest.raises(ConfigError, match="width 96, 3 heads, MLP ratio 4 is no variant of the table"):
        resolve_recipe(_recipe(f"model.pretrained={odd}", *data, name="finetune"))
    with pytest.raises(ConfigError, match="model.pretrained is empty: --set model.pretrained=FILE"):
        resolve_recipe(_recipe(*data, name="finetune"))


@pytest.mark.slow
def test_finetune_recipe_runs_on_the_ipu_backend(abc_shards, tmp_path, monkeypatch):
    """Through the PopTorch test double: fp16 model, layer-wise decay pushed per group, the data's names saved."""
    import sys

    import poptorch_double
    from vit_accel.checkpoints import model_from_checkpoint

    monkeypatch.setitem(sys.modules, "poptorch", poptorch_double)
    monkeypatch.setattr(poptorch_double, "HARDWARE_IPUS", 64)
    monkeypatch.chdir(tmp_path)
    _pretrained("pre.safetensors")
    d = abc_shards
    assert main(["train", "--backend", "ipu", "--config", "finetune", "--run-dir", "run", "--no-progress",
                 "--set", "model.pretrained=pre.safetensors", "--set", f"data.train_shards={d}/train.json",
                 "--set", f"data.val_shards={d}/val.json", "--set", "data.workers=0", "--set", "schedule.epochs=2",
                 "--set", "train.global_batch_size=4", "--set", "ipu.micro_batch_size=1",
                 "--set", "ipu.gradient_accumulation=4", "--set", "ipu.loader_mode=sync"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["backend"] == "ipu" and summary["steps"] == 4 and summary["val_class_names"] == ["a", "b", "c"]
    assert model_from_checkpoint("run/checkpoints/step_0000004.pt")[0].cfg.class_names == ("a", "b", "c")


# ---------------------------------------------------------------------------------------
# names travel with the weights
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,dst,keeps", [("vit-accel", "m.safetensors", True), ("timm", "timm-dir", True),
                                           ("timm", "m.pth", False), ("hf", "hf-dir", True), ("npz", "m.npz", True),
                                           ("mmcls", "m.pth", True)])
def test_class_names_are_written_where_each_format_keeps_them(tmp_path, fmt, dst, keeps):
    from vit_accel.checkpoints import inspect_checkpoint, model_from_checkpoint

    path = _pretrained(tmp_path / dst, num_classes=3, class_names=("cat", "dog", "eel"), format=fmt)
    names = ("cat", "dog", "eel") if keeps else ()
    assert model_from_checkpoint(path)[0].cfg.class_names == names
    assert inspect_checkpoint(path)["class_names"] == list(names)
    if fmt == "mmcls":   # where MMClassification 0.x and mmpretrain 1.x keep them
        meta = torch.load(path, weights_only=True)["meta"]
        assert meta["CLASSES"] == meta["dataset_meta"]["classes"] == ["cat", "dog", "eel"]


def test_foreign_names_and_placeholders(tmp_path):
    from vit_accel.checkpoints import model_from_checkpoint

    hf = _pretrained(tmp_path / "hf", num_classes=3, class_names=(), format="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}   # HF's own "no names"
    del cfg["vit_accel_config"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert model_from_checkpoint(hf)[0].cfg.class_names == ()
    cfg["id2label"] = {"0": "tabby", "1": "tiger", "2": "lynx"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert model_from_checkpoint(hf)[0].cfg.class_names == ("tabby", "tiger", "lynx")
    mm = torch.load(_pretrained(tmp_path / "mm.pth", num_classes=3, format="mmcls"), weights_only=True)
    mm["meta"] = {"dataset_meta": {"classes": ("x", "y", "z")}}                 # an mmpretrain 1.x file
    torch.save(mm, tmp_path / "mm.pth")
    assert model_from_checkpoint(str(tmp_path / "mm.pth"))[0].cfg.class_names == ("x", "y", "z")


def test_predict_without_names_says_class_n_and_reads_the_checkpoint_once(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import vit_accel.checkpoints.files as files

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "red.jpg")
    ckpt = tmp_path / "plain.pth"
    _pretrained(ckpt, num_classes=4, class_names=(), format="timm")
    loads = []
    real = files.torch.load
    monkeypatch.setattr(files.torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "red.jpg")]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["class"] * 4 and len(loads) == 1
