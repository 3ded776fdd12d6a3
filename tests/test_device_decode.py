"""data.decode=gpu: the workers ship JPEG bytes with the crop boxes and flips the CPU path draws;
the device decodes, crops and flips. Without a GPU, torchvision's CPU JPEG decoder stands in for
nvJPEG (device="cpu", the same code); the CUDA test runs where a device is."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vit_accel.config import ConfigError, load_recipe
from vit_accel.data import DataError, TrainLoader, resolve_shards, write_shards
from vit_accel.data import device_decode as DD
from vit_accel.data.batches import EncodedBatch, PixelBatch
from vit_accel.data.shards import SourceSample
from vit_accel.data.transforms import DecodeError, random_resized_crop_box

pytest.importorskip("torchvision.io", reason="the device path decodes with torchvision")
from conftest import requires_cuda  # noqa: E402

ARGS = ((0.08, 1.0), (0.75, 4 / 3), "bilinear", 0.5, "auto", None)


@pytest.fixture(scope="module")
def photos():
    from vit_accel.data.corpus import corpus_images

    return corpus_images(6)


def _png(seed=0):
    rng = np.random.RandomState(seed)
    out = io.BytesIO()
    Image.fromarray((rng.rand(30, 40, 3) * 255).astype(np.uint8)).resize((80, 60)).save(out, "PNG")
    return out.getvalue()


def _both(samples, size=224, seeds=None):
    """(device path output on the CPU stand-in, CPU path batch, the encoded batch). At 224 px no crop of a
    500x375 photo lets the CPU path decode at reduced size, which the device path never does."""
    seeds = seeds or list(range(len(samples)))
    enc, pix = EncodedBatch(len(samples), size, "bilinear"), PixelBatch(len(samples), size, shared=False)
    for n, (data, seed) in enumerate(zip(samples, seeds)):
        enc.put(n, data, random.Random(seed), *ARGS)
        pix.put(n, data, random.Random(seed), *ARGS)
    labels = torch.arange(len(samples))
    out, out_labels, bad = DD.DeviceDecoder("cpu")(enc.images, labels, ["k%d" % i for i in range(len(samples))])
    assert torch.equal(out_labels, labels) and not bad
    return out, pix.images, enc.images


def test_device_batch_has_the_cpu_paths_boxes_flips_and_pixels(photos):
    out, cpu, enc = _both(photos + [_png()])
    assert out.shape == cpu.shape == (7, 3, 224, 224) and out.dtype == torch.uint8
    for n, data in enumerate(photos):  # the same draws as the CPU path: box, then flip
        rng = random.Random(n)
        w, h = Image.open(io.BytesIO(data)).size
        assert tuple(enc.boxes[n].tolist()) == random_resized_crop_box(w, h, (0.08, 1.0), (0.75, 4 / 3), rng)
        assert bool(enc.flips[n]) == (rng.random() < 0.5)
    assert enc.host_index.tolist() == [6] and torch.equal(out[6], cpu[6])  # the PNG was decoded by the worker
    # float32 resampling on the device against the CPU's uint8 kernel: a level at most
    diff = (out.int() - cpu.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.25


def test_truncated_jpeg_is_left_to_the_worker_and_skipped_there(photos):
    enc = EncodedBatch(2, 32, "bilinear")
    with pytest.raises(DecodeError):
        enc.put(0, photos[0][: len(photos[0]) // 2], random.Random(0), *ARGS)  # no EOI: the CPU path, which fails
    enc.put(0, photos[1], random.Random(1), *ARGS)
    enc.put(1, photos[2], random.Random(2), *ARGS)
    assert enc.images.host_index.numel() == 0 and enc.images.offsets.tolist()[-1] == len(photos[1]) + len(photos[2])


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu_with_the_same_box(photos, monkeypatch):
    ref, _, enc = _both(photos[:3])
    real = DD._torchvision_decode_jpeg()
    refused = bytes(enc.jpeg(1).numpy())

    def refuses_one(data, device):  # nvJPEG refusing one image fails the batched call
        items = data if isinstance(data, list) else [data]
        if any(bytes(d.numpy()) == refused for d in items):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, device)

    out, labels, bad = DD.DeviceDecoder("cpu", decode=refuses_one)(enc, torch.arange(3), ["a", "b", "c"])
    assert torch.equal(out, ref) and not bad
    # nothing decodes it: counted, named, and its slot takes another sample's image and label
    monkeypatch.setattr(DD, "decode_for_crop", lambda *a: (_ for _ in ()).throw(DecodeError("broken")))
    out, labels, bad = DD.DeviceDecoder("cpu", decode=refuses_one)(enc, torch.tensor([7, 8, 9]), ["a", "b", "c"])
    assert bad == [("b", "decode on cpu and on the CPU failed: broken")]
    assert labels.tolist() == [7, 7, 9] and torch.equal(out[1], out[0])


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory, photos):
    from vit_accel.data.corpus import corpus_images

    d = tmp_path_factory.mktemp("photo_shards")
    jpegs = photos + corpus_images(18, seed=1)
    samples = [SourceSample("p%02d" % i, i % 3, "mem", data=data) for i, data in enumerate(jpegs)]
    write_shards(samples, str(d), "train", ["a", "b", "c"], samples_per_shard=12, log=lambda m: None)
    return str(d / "train.json")


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_with_device_decode_gives_the_cpu_loaders_batches(photo_shards, workers):
    def batches(decode):
        loader = TrainLoader(resolve_shards(photo_shards), 224, 4, seed=1, workers=workers, decode=decode,
                             decode_device="cpu", return_keys=True)
        it = iter(loader)
        out = [next(it) for _ in range(4)]
        return out, loader.state_dict()

    (gpu, gpu_state), (cpu, cpu_state) = batches("gpu"), batches("cpu")
    assert gpu_state == cpu_state  # the same positions: resume works alike
    for (gi, gl, gk), (ci, cl, ck) in zip(gpu, cpu):
        assert gk == ck and torch.equal(gl, cl) and gi.shape == ci.shape == (4, 3, 224, 224)
        assert (gi.int() - ci.int()).abs().max() <= 1


def test_device_decode_settings_are_checked():
    with pytest.raises(ConfigError, match="data.decode=gpu decodes and crops on the device, but data.rand_augment"):
        load_recipe("vit-ti-digits", ["data.decode=gpu", "data.rand_augment=rand-m9-mstd0.5-inc1"])
    with pytest.raises(ConfigError, match="data.decode must be one of cpu, gpu"):
        load_recipe("vit-ti-digits", ["data.decode=tpu"])
    assert load_recipe("vit-ti-digits", ["data.decode=gpu"]).data.decode == "gpu"
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="needs a CUDA device.*set data.decode=cpu"):
            DD.DeviceDecoder("cuda")


@requires_cuda
def test_nvjpeg_batch_matches_the_cpu_path(photos):
    enc, pix = EncodedBatch(len(photos), 224, "bicubic"), PixelBatch(len(photos), 224, shared=False)
    for n, data in enumerate(photos):
        enc.put(n, data, random.Random(n), (0.08, 1.0), (0.75, 4 / 3), "bicubic", 0.5, "auto", None)
        pix.put(n, data, random.Random(n), (0.08, 1.0), (0.75, 4 / 3), "bicubic", 0.5, "auto", None)
    out, _, bad = DD.DeviceDecoder("cuda")(enc.images, torch.arange(len(photos)), [str(i) for i in range(len(photos))])
    assert out.device.type == "cuda" and not bad
    # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few levels; the crops are the same
    assert (out.cpu().float() - pix.images.float()).abs().mean() < 1.5
