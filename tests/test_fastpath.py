"""The loader's fast per-sample path against the library ops it replaces, on fixed parameters:
torchvision's tensor resized_crop + horizontal_flip (exact), PIL's crop + resize (the sources'
PIL path, within a level or two), torchvision's eval Resize + CenterCrop; header parsing,
reduced decodes, fallbacks to PIL with the same box, bad bytes, shared-memory batches."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vit_accel.data import fastpath as FP
from vit_accel.data import transforms as T
from vit_accel.data.batches import PixelBatch, shared_uint8

VF = pytest.importorskip("torchvision.transforms.v2.functional", reason="the oracle is torchvision's own op")


def _photo(w, h, seed=0):
    rng = np.random.RandomState(seed)
    small = (rng.rand(max(h // 12, 2), max(w // 12, 2), 3) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def _jpeg(img, **kw):
    out = io.BytesIO()
    img.save(out, "JPEG", quality=kw.pop("quality", 90), **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo_jpegs():
    from vit_accel.data.corpus import corpus_images

    return corpus_images(4)  # real photographs, 500x375 / 375x500, quality 90


# ----------------------------------------------------------------------------- header

def test_jpeg_size_reads_the_frame_header_of_every_kind():
    img = _photo(61, 47)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    kinds = [_jpeg(img), _jpeg(img, progressive=True), _jpeg(img.convert("L")), _jpeg(img.convert("CMYK")),
             _jpeg(img, exif=exif.tobytes(), icc_profile=b"\0" * 3000), _jpeg(img, subsampling=0)]
    for data in kinds:
        assert FP.jpeg_size(data) == (61, 47) == Image.open(io.BytesIO(data)).size
    png = io.BytesIO()
    img.save(png, "PNG")
    for not_jpeg in [png.getvalue(), b"", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", kinds[0][:20], b"GIF89a" * 10]:
        assert FP.jpeg_size(not_jpeg) is None


# ----------------------------------------------------------------------------- train: the library ops

@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_sample_is_torchvisions_resized_crop_and_flip(photo_jpegs, interpolation):
    """At 224 px no crop of a 500x375 image allows a reduced decode: the full-size path throughout."""
    mode = VF.InterpolationMode.BILINEAR if interpolation == "bilinear" else VF.InterpolationMode.BICUBIC
    for i, data in enumerate(photo_jpegs):
        pil_image = Image.open(io.BytesIO(data)).convert("RGB")
        full = torch.from_numpy(np.array(pil_image)).permute(2, 0, 1)
        for seed in range(4):
            out = torch.empty((3, 224, 224), dtype=torch.uint8)
            FP.train_sample(data, out, 224, random.Random(seed), interpolation=interpolation)
            rng = random.Random(seed)  # the draws: box, then flip
            left, top, w, h = T.random_resized_crop_box(full.shape[2], full.shape[1], (0.08, 1.0), (0.75, 4 / 3), rng)
            flip = rng.random() < 0.5
            ref = VF.resized_crop(full, top, left, h, w, [224, 224], interpolation=mode, antialias=True)
            assert torch.equal(out, VF.horizontal_flip(ref) if flip else ref), (i, seed)
            # the PIL path the sources run (crop, then resize): the same image up to rounding
            pil = pil_image.crop((left, top, left + w, top + h)).resize((224, 224), T.resample_filter(interpolation))
            pil = np.asarray(pil.transpose(Image.FLIP_LEFT_RIGHT) if flip else pil).astype(int)
            diff = np.abs(out.permute(1, 2, 0).numpy().astype(int) - pil)
            assert diff.mean() < 0.6 and np.percentile(diff, 99.9) <= 3, (i, seed, diff.mean(), diff.max())


def test_reduced_decode_where_the_crop_allows_it():
    data = _jpeg(_photo(1280, 960), quality=92)
    pixels = FP.decode_for_crop(data, (1280, 960), (400, 300), "auto")
    assert tuple(pixels.shape) == (3, 480, 640)  # 1/2 holds the 400 x 300 the output needs, 1/4 would not
    assert tuple(FP.decode_for_crop(data, (1280, 960), (700, 500), "auto").shape) == (3, 960, 1280)
    # a whole-image crop to 64 px decodes at 1/8 and lands within a level or two of the full decode
    out = torch.empty((3, 64, 64), dtype=torch.uint8)
    FP.train_sample(data, out, 64, random.Random(0), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=0.0)
    full = torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1)
    ref = VF.resized_crop(full, 0, 0, 960, 1280, [64, 64], antialias=True)
    assert (out.float() - ref.float()).abs().mean() < 2.0


def test_a_jpeg_the_fast_decoder_refuses_gets_the_same_box_from_pil(photo_jpegs, monkeypatch):
    data = photo_jpegs[1]
    fast = torch.empty((3, 48, 48), dtype=torch.uint8)
    FP.train_sample(data, fast, 48, random.Random(5), decoder="torchvision")

    def refuses(_):
        raise RuntimeError("decode_jpeg: unsupported")  # what torchvision raises for what it cannot read

    monkeypatch.setattr(FP, "_torchvision_decode", lambda: refuses)
    fallback = torch.empty_like(fast)
    FP.train_sample(data, fallback, 48, random.Random(5), decoder="torchvision")
    assert torch.equal(fast, fallback)  # PIL decodes the same pixels, and the box is the same


def test_torch_without_uint8_resize_takes_the_pil_path_with_the_same_box(photo_jpegs, monkeypatch):
    data = photo_jpegs[0]
    fast = torch.empty((3, 224, 224), dtype=torch.uint8)
    FP.train_sample(data, fast, 224, random.Random(2), hflip=1.0)
    monkeypatch.setitem(FP._caps, "aa", False)
    pil = torch.empty_like(fast)
    FP.train_sample(data, pil, 224, random.Random(2), hflip=1.0)
    assert np.array_equal(pil.permute(1, 2, 0).numpy(), T.train_transform(data, 224, random.Random(2), hflip=1.0))
    assert (fast.float() - pil.float()).abs().mean() < 0.1  # same crop and flip, another resampler


def test_bad_bytes_raise_decode_error_and_png_decodes(photo_jpegs):
    good = photo_jpegs[0]
    out = torch.empty((3, 16, 16), dtype=torch.uint8)
    for bad in [b"", b"not an image", good[:300], good[: len(good) // 2], good[:-10]]:
        with pytest.raises(T.DecodeError):
            FP.train_sample(bad, out, 16, random.Random(0))
    png = io.BytesIO()
    _photo(40, 30).save(png, "PNG")
    FP.train_sample(png.getvalue(), out, 16, random.Random(0))
    ref = torch.empty_like(out)
    FP.train_sample(_jpeg(_photo(40, 30), quality=100), ref, 16, random.Random(0))
    assert (out.float() - ref.float()).abs().mean() < 3  # the same picture, the same crop


# ----------------------------------------------------------------------------- eval

@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_sample_is_torchvisions_resize_and_center_crop(photo_jpegs, interpolation):
    mode = VF.InterpolationMode.BILINEAR if interpolation == "bilinear" else VF.InterpolationMode.BICUBIC
    for data in photo_jpegs:
        out = torch.empty((3, 224, 224), dtype=torch.uint8)
        FP.eval_sample(data, out, 224, 256, interpolation)
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        ref = VF.center_crop(VF.resize(tensor, [256], interpolation=mode, antialias=True), [224])
        assert torch.equal(out, ref)  # torchvision's tensor ops, exactly
        # and the PIL computation (timm's, torchvision's on PIL images): a level in ~0.3% of the values
        diff = (out.int() - torch.from_numpy(T.eval_transform(data, 224, 256, interpolation).copy()).permute(
            2, 0, 1).int()).abs()
        assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01
    small = torch.empty((3, 64, 64), dtype=torch.uint8)
    FP.eval_sample(_jpeg(_photo(40, 30)), small, 64, 32)  # smaller than the crop: padded, not stretched
    assert not small[:, :16].any() and small[:, 16:48, 12:52].any()


# ----------------------------------------------------------------------------- batches

def test_worker_batches_live_in_shared_memory(photo_jpegs):
    assert shared_uint8((2, 3, 8, 8), True).is_shared() and not shared_uint8((2, 3, 8, 8), False).is_shared()
    batch = PixelBatch(2, 32, shared=True)
    for n, data in enumerate(photo_jpegs[:2]):
        batch.put(n, data, random.Random(n), (0.08, 1.0), (0.75, 4 / 3), "bilinear", 0.5, "auto", None)
        ref = torch.empty((3, 32, 32), dtype=torch.uint8)
        FP.train_sample(data, ref, 32, random.Random(n))
        assert torch.equal(batch.images[n], ref)
    assert batch.images.is_shared()


def test_per_image_work_runs_on_one_thread_and_restores_the_callers_count(photo_jpegs):
    seen = []

    @FP.one_thread
    def work():
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        work()
        FP.train_sample(photo_jpegs[0], torch.empty((3, 32, 32), dtype=torch.uint8), 32, random.Random(0))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
