"""Host transforms (decode, crops, flips, eval crop) and the device op normalize (mixup/cutmix: test_augment.py)."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vit_accel.data import normalize
from vit_accel.data import transforms as T


def _encode(arr, fmt="JPEG", mode=None):
    out = io.BytesIO()
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    img.save(out, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


def _photo(w, h, seed=0):
    rng = np.random.RandomState(seed)
    small = (rng.rand(max(h // 16, 2), max(w // 16, 2), 3) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def test_random_resized_crop_box_fits_and_is_seeded():
    for w, h in [(50, 40), (40, 300), (500, 375), (3, 2)]:
        for seed in range(30):
            left, top, cw, ch = T.random_resized_crop_box(w, h, (0.08, 1.0), (0.75, 4 / 3), random.Random(seed))
            assert 0 <= left and 0 <= top and 0 < cw and 0 < ch and left + cw <= w and top + ch <= h
    a = T.random_resized_crop_box(500, 375, (0.08, 1.0), (0.75, 4 / 3), random.Random(4))
    assert a == T.random_resized_crop_box(500, 375, (0.08, 1.0), (0.75, 4 / 3), random.Random(4))
    # A ratio no crop can satisfy falls back to the centered crop with the aspect clamped.
    assert T.random_resized_crop_box(100, 10, (0.9, 1.0), (0.5, 0.6), random.Random(0)) == (47, 0, 6, 10)


@pytest.mark.parametrize("fmt,mode", [("JPEG", None), ("PNG", None), ("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "L")])
def test_train_transform_sizes_and_modes(fmt, mode):
    data = _encode(_photo(61, 47), fmt, mode)
    out = T.train_transform(data, 24, random.Random(0))
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_train_transform_is_a_function_of_the_seed_and_flip_mirrors():
    data = _encode(_photo(80, 60))
    a = T.train_transform(data, 32, random.Random(11), hflip=0.0)
    assert np.array_equal(a, T.train_transform(data, 32, random.Random(11), hflip=0.0))
    assert not np.array_equal(a, T.train_transform(data, 32, random.Random(12), hflip=0.0))
    # The flip draw comes after the crop draws, so the same seed crops the same window.
    assert np.array_equal(T.train_transform(data, 32, random.Random(11), hflip=1.0), a[:, ::-1])
    bicubic = T.train_transform(data, 32, random.Random(11), hflip=0.0, interpolation="bicubic")
    assert bicubic.shape == a.shape and not np.array_equal(bicubic, a)
    with pytest.raises(ValueError, match="interpolation"):
        T.train_transform(data, 32, random.Random(0), interpolation="nearest")


def test_jpeg_draft_decode_matches_full_decode_closely():
    data = _encode(_photo(800, 600))
    img = T.open_image(data)
    drafted = T.load_rgb(img, data, "pil", (200, 150))
    assert drafted.size == (200, 150)  # libjpeg decoded at 1/4 scale
    full = T.decode_image(data).resize((200, 150), Image.BILINEAR)
    assert np.abs(np.asarray(drafted, np.float32) - np.asarray(full, np.float32)).mean() < 4.0
    # Through the train transform: a full-image crop to 64 px lets the decoder work at 1/8.
    out = T.train_transform(data, 64, random.Random(0), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=0.0)
    ref = np.asarray(T.decode_image(data).resize((64, 64), Image.BILINEAR), np.float32)
    assert np.abs(out.astype(np.float32) - ref).mean() < 6.0


def test_bad_bytes_raise_decode_error():
    good = _encode(_photo(64, 64))
    for bad in [b"", b"not an image", good[:300], good[: len(good) // 2]]:
        with pytest.raises(T.DecodeError):
            T.train_transform(bad, 16, random.Random(0))


def test_eval_transform_resizes_shorter_side_then_center_crops():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :, 1] = np.arange(80)[None, :] * 3
    data = _encode(arr, "PNG")
    out = T.eval_transform(data, 20, resize=40)  # shorter side already 40: no resampling, crop the center
    assert out.shape == (20, 20, 3)
    assert out[0, :, 1].tolist() == [x * 3 for x in range(30, 50)]
    assert T.eval_transform(data, 20).shape == (20, 20, 3)  # resize 0 -> img_size
    assert T.resize_shorter_size(500, 375, 256) == (341, 256) and T.resize_shorter_size(375, 500, 256) == (256, 341)
    assert T.eval_transform(_encode(_photo(10, 12), "PNG"), 16, resize=8).shape == (16, 16, 3)  # padded, not stretched


def test_simplejpeg_path_with_a_test_double(monkeypatch):
    """The simplejpeg branch, exercised with a double of its decode_jpeg (PIL underneath)."""
    calls = []

    class FakeSimpleJpeg:
        @staticmethod
        def decode_jpeg(data, colorspace="RGB", min_width=0, min_height=0):
            calls.append((min_width, min_height))
            return np.asarray(Image.open(io.BytesIO(data)).convert(colorspace))

    monkeypatch.setattr(T, "_simplejpeg", FakeSimpleJpeg)
    from vit_accel.data import jpeg_region

    first = "torchvision" if jpeg_region.unavailable() else "libjpeg"  # libjpeg: where it builds here
    assert T.resolve_decoder("auto") == first  # where torchvision imports
    monkeypatch.setattr(T, "_importable", lambda module: False)
    assert T.resolve_decoder("auto") == "simplejpeg"
    jpeg, png = _encode(_photo(50, 40)), _encode(_photo(50, 40), "PNG")  # too small for draft mode
    a = T.train_transform(jpeg, 32, random.Random(3), decoder="simplejpeg")
    assert np.array_equal(a, T.train_transform(jpeg, 32, random.Random(3), decoder="pil"))
    assert len(calls) == 1 and calls[0][0] >= 32
    T.train_transform(png, 32, random.Random(3), decoder="simplejpeg")  # PNG still goes through PIL
    assert len(calls) == 1
    monkeypatch.setattr(T, "_simplejpeg", None)
    assert T.resolve_decoder("auto") == "pil"
    with pytest.raises(ValueError, match="not installed"):
        T.resolve_decoder("simplejpeg")
    with pytest.raises(ValueError, match="torchvision is not installed"):
        T.resolve_decoder("torchvision")


def test_normalize_values_dtypes_and_shape_check():
    x = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    y = normalize(x, [127.5, 127.5, 127.5], [127.5, 127.5, 127.5])
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([-1.0, -0.5 / 127.5, 1.0]))
    m, s = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    z = normalize(x, m, s, dtype=torch.bfloat16)
    ref = (x.float() - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1)
    assert z.dtype == torch.bfloat16 and torch.allclose(z.float(), ref, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="C == len"):
        normalize(x, [0.0], [1.0])
