"""The partial JPEG decoder (`vit_accel/data/jpeg_region.py`) against torchvision's full decode.

Generated files (sizes, chroma subsamplings, progressive, grayscale, restart markers, qualities)
and boxes (random, one pixel, touching every edge): the box's pixels equal the full decode's.
Training crops and evaluation's center crops equal the exact path's samples. Damaged files
(truncated, truncated with an end marker, flipped bytes, a cut-out run): the samples are the
exact path's, or both refuse. A decoder that cannot build says why and `auto` moves on."""
import io
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vit_accel.data import fastpath as FP
from vit_accel.data import jpeg_region as JR
from vit_accel.data import transforms as T

pytest.importorskip("torchvision.io", reason="the oracle is torchvision's full decode")
if JR.unavailable():
    pytest.skip("the partial decoder does not build here: %s" % JR.unavailable(), allow_module_level=True)


@pytest.fixture(scope="module")
def photo_corpus():
    from vit_accel.data.corpus import corpus_images

    return corpus_images(4)  # real photographs, 500x375 / 375x500, quality 90


def _full(data):
    return FP.torchvision_jpeg_ops()[0](torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _generated(seed):
    """A JPEG with textured content (sharp edges and noise: upsampling differences show)."""
    rng = random.Random(seed)
    w, h = rng.randint(1, 260), rng.randint(1, 260)
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([(x * 7 + y * 3) % 256, 128 + 100 * np.sin(x / 5.0 + y / 9.0), (x ^ y) % 256], -1)
    img = Image.fromarray(np.clip(pixels + g.normal(0, 30, pixels.shape), 0, 255).astype(np.uint8))
    kw = dict(quality=rng.choice([40, 75, 90, 97]), subsampling=rng.choice([0, 1, 2]))
    if rng.random() < 0.25:
        kw["progressive"] = True
    if rng.random() < 0.25:
        kw["restart_marker_blocks"] = rng.randint(1, 6)
    if rng.random() < 0.2:
        img = img.convert("L")
    out = io.BytesIO()
    img.save(out, "JPEG", **kw)
    return out.getvalue(), (w, h), kw


def _boxes(size, rng, n):
    w, h = size
    yield (0, 0, w, h)
    yield (w - 1, h - 1, 1, 1)
    yield (0, h - 1, w, 1)
    for _ in range(n):
        bw, bh = rng.randint(1, w), rng.randint(1, h)
        left = rng.choice([0, w - bw, rng.randint(0, w - bw)])
        top = rng.choice([0, h - bh, rng.randint(0, h - bh)])
        yield (left, top, bw, bh)


def _check(data, size, box):
    got = JR.decode_box(data, size, box)
    assert got is not None, (box, JR.why_refused(data, size, box))
    window, (left, top, w, h) = got
    return window[:, top:top + h, left:left + w]


def test_the_box_holds_the_full_decodes_pixels_over_generated_files_and_boxes():
    rng = random.Random(0)
    for seed in range(160):
        data, size, kw = _generated(seed)
        full = _full(data)
        for box in _boxes(size, rng, 12):
            left, top, w, h = box
            assert torch.equal(_check(data, size, box), full[:, top:top + h, left:left + w]), (seed, kw, size, box)


def test_without_the_margin_the_region_edges_differ(monkeypatch):
    """The margin is what makes it exact: at the region's own edges chroma upsampling has no
    neighbour, and the comparison above sees it when the margin is taken away."""
    monkeypatch.setattr(JR, "MARGIN", 0)
    rng, differ = random.Random(1), 0
    for seed in range(40):
        data, size, kw = _generated(seed)
        if kw["subsampling"] == 0 or size[0] < 48:
            continue
        full = _full(data)
        for left, top, w, h in _boxes(size, rng, 6):
            differ += not torch.equal(_check(data, size, (left, top, w, h)), full[:, top:top + h, left:left + w])
    assert differ > 0


def test_train_sample_with_the_partial_decoder_is_the_exact_paths(photo_corpus):
    for interpolation in ("bilinear", "bicubic"):
        for i, data in enumerate(photo_corpus):
            for seed in range(6):
                a, b = torch.empty((2, 3, 224, 224), dtype=torch.uint8)
                FP.train_sample(data, a, 224, random.Random(seed), interpolation=interpolation, decoder="libjpeg")
                FP.train_sample(data, b, 224, random.Random(seed), interpolation=interpolation, decoder="torchvision")
                assert torch.equal(a, b), (interpolation, i, seed)


def test_eval_sample_reading_only_the_center_crops_sources_is_the_exact_paths(photo_corpus, monkeypatch):
    """Evaluation decodes only the source pixels its center crop's resize reads (a canvas of the
    image's size): down- and upscaled, bilinear and bicubic, crops larger than the image (padded)."""
    canvas = []
    real = JR.decode_into_canvas
    monkeypatch.setattr(JR, "decode_into_canvas", lambda *a: canvas.append(a[2]) or real(*a))
    for i, data in enumerate(photo_corpus[:2] + [_generated(seed)[0] for seed in range(40)]):
        for interpolation in ("bilinear", "bicubic"):
            for img_size, resize in ((224, 256), (32, 40), (24, 24), (48, 36)):
                a, b = torch.empty((2, 3, img_size, img_size), dtype=torch.uint8)
                FP.eval_sample(data, a, img_size, resize, interpolation, "libjpeg")
                FP.eval_sample(data, b, img_size, resize, interpolation, "torchvision")
                assert torch.equal(a, b), (i, interpolation, img_size, resize)
    w, h = FP.jpeg_size(photo_corpus[0])
    assert any(box[2] * box[3] < 0.7 * w * h for box in canvas)  # the photos' crops read a part only


def _damaged(good, rng):
    n = len(good)
    cut = rng.randint(n // 8, n - 3)
    pos = rng.randint(n // 8, n - 3)
    flipped = good[:pos] + bytes([good[pos] ^ (1 << rng.randint(0, 7))]) + good[pos + 1:]
    return [good[:cut], good[:cut] + b"\xff\xd9", flipped, good[:pos] + good[pos + 40:]]


def test_damaged_files_give_the_exact_paths_sample_or_both_refuse(photo_corpus):
    """Whatever the partial decoder accepts equals the exact path; what it refuses, the exact path
    decides (a truncated file without its end marker: DecodeError, never the part before the cut)."""
    rng = random.Random(2)
    outcomes = set()
    for i, good in enumerate(photo_corpus):
        for bad in _damaged(good, rng) * 2:
            seed = rng.randint(0, 1 << 30)
            results = []
            for decoder in ("libjpeg", "torchvision"):
                out = torch.empty((2, 3, 64, 64), dtype=torch.uint8)
                try:
                    FP.train_sample(bad, out[0], 64, random.Random(seed), decoder=decoder)
                    FP.eval_sample(bad, out[1], 64, 73, decoder=decoder)
                    results.append(out)
                except T.DecodeError:
                    results.append(None)
            assert (results[0] is None) == (results[1] is None), (i, len(bad))
            if results[0] is not None:
                assert torch.equal(results[0], results[1]), (i, len(bad))
            outcomes.add(results[0] is None)
    assert outcomes == {True, False}  # the class held files both ways
    size = FP.jpeg_size(photo_corpus[0])
    assert JR.decode_box(photo_corpus[0][:-2], size, (0, 0, 8, 8)) is None  # no end marker: never partial
    assert JR.why_refused(photo_corpus[0][:-2], size, (0, 0, 8, 8)).startswith("no end-of-image marker")
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(photo_corpus[0])).convert("CMYK").save(cmyk, "JPEG")
    assert JR.decode_box(cmyk.getvalue(), size, (0, 0, 8, 8)) is None
    assert JR.why_refused(photo_corpus[0][: len(photo_corpus[0]) // 3] + b"\xff\xd9", size,
                          (0, size[1] - 8, 8, 8)).startswith("Corrupt JPEG data")


def test_a_decoder_that_cannot_build_says_why_and_auto_moves_on(tmp_path, monkeypatch):
    monkeypatch.setattr(JR, "_state", {})  # this process's decoder, forgotten for the test
    monkeypatch.setenv("VIT_ACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")
    why = JR.unavailable()
    assert why.startswith("false failed"), why
    assert T.resolve_decoder("auto") == "torchvision"
    with pytest.raises(ValueError, match="data.decoder=libjpeg cannot work here: false failed.*data.decoder=auto"):
        T.resolve_decoder("libjpeg")
    assert JR.decode_box(b"\xff\xd8", (1, 1), (0, 0, 1, 1)) is None
    assert not list((tmp_path / "cache").iterdir())  # nothing half-built left behind


def test_the_library_builds_once_into_the_cache_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(JR, "_state", {})
    monkeypatch.setenv("VIT_ACCEL_CACHE", str(tmp_path))
    assert JR.unavailable() == ""
    built = list(tmp_path.glob("jpeg_region-*.so"))
    assert built == [JR._library_path()]
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(JR, "_state", {})  # as another process would: the file is there
    monkeypatch.setenv("CC", "false")  # so nothing compiles again
    assert JR.unavailable() == "" and built[0].stat().st_mtime_ns == stamp
    data = _generated(3)[0]
    assert JR.decode_box(data, FP.jpeg_size(data), (0, 0, 1, 1)) is not None


def test_a_library_others_could_have_written_is_never_loaded(tmp_path, monkeypatch):
    """A shared library in a folder other users can write is their code in our process: refused,
    with what to do, and `auto` decodes the exact way."""
    monkeypatch.setattr(JR, "_state", {})
    monkeypatch.setenv("VIT_ACCEL_CACHE", str(tmp_path / "cache"))
    assert JR.unavailable() == ""
    built = JR._library_path()
    for target in (built.parent, built):
        mode = target.stat().st_mode
        target.chmod(mode | 0o002)
        monkeypatch.setattr(JR, "_state", {})
        why = JR.unavailable()
        assert why == "%s is writable by others (chmod go-w it, or set VIT_ACCEL_CACHE to a private folder)" % target
        assert T.resolve_decoder("auto") == "torchvision"
        target.chmod(mode)
    built.unlink()
    built.parent.chmod(0o777)  # nothing is built into such a folder either
    monkeypatch.setattr(JR, "_state", {})
    assert "writable by others" in JR.unavailable() and not built.exists()
    built.parent.chmod(0o700)


def test_a_cache_folder_that_cannot_be_made_says_why(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(JR, "_state", {})
    monkeypatch.setenv("VIT_ACCEL_CACHE", str(blocker / "cache"))
    why = JR.unavailable()
    assert why.startswith("cannot build or load %s" % blocker) and "Not a directory" in why, why
    assert T.resolve_decoder("auto") == "torchvision"


@pytest.mark.parametrize("source,said", [
    ("#include <no_such_jpeglib.h>\n", "no_such_jpeglib.h: No such file or directory"),
    ("void jpeg_crop_scanline_of_another_libjpeg(void);\nint f(void) { jpeg_crop_scanline_of_another_libjpeg(); "
     "return 0; }\n", "undefined reference to `jpeg_crop_scanline_of_another_libjpeg'"),
])
def test_a_failed_build_names_the_compilers_first_error(tmp_path, monkeypatch, source, said):
    """No libjpeg-turbo headers, or a libjpeg without the partial-decoding calls: the build fails
    now (every symbol resolved at link time, not at a worker's first call) and says why."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the link-time symbol check is GNU ld's (Linux)")
    src = tmp_path / "jpeg_region.c"
    src.write_text(source)
    monkeypatch.setattr(JR, "SOURCE", src)
    out = tmp_path / "cache" / "lib.so"
    why = JR.build(out)
    assert " failed: " in why and said in why, why
    assert not out.exists() and list(out.parent.iterdir()) == []
