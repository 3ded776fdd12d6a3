"""Augmentations against the libraries they come from: AutoAugment (torchvision), RandAugment and
Mixup/CutMix (timm), mmpretrain's random erasing; seeded per sample; soft-target loss; settings."""
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vit_accel.config import ConfigError, load_recipe
from vit_accel.data import BatchMix, DataError, SampleAugment
from vit_accel.data.augment import (ERASE_AREA, ERASE_ASPECT, parse_rand_augment,
                                    random_erase, seeded_global_rngs, timm_rand_augment)

v2 = pytest.importorskip("torchvision.transforms.v2", reason="AutoAugment comes from torchvision")
timm_aa = pytest.importorskip("timm.data.auto_augment", reason="RandAugment and Mixup come from timm")
from timm.data.mixup import Mixup  # noqa: E402

MMP_MEAN, MMP_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
RA = "rand-m9-mstd0.5-inc1"  # mmpretrain's 'timm_increasing', num_policies 2, magnitude 9, std 0.5


def _photo(w=40, h=32, seed=0):
    rng = np.random.RandomState(seed)
    small = (rng.rand(h // 4, w // 4, 3) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def _global_draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


# ----------------------------------------------------------------------------- per-sample policies

def test_seeded_global_rngs_restores_the_callers_state():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = _global_draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with seeded_global_rngs(5):
        inside = _global_draws()
    with seeded_global_rngs(5):
        assert _global_draws() == inside
    assert _global_draws() == expected


def test_auto_augment_rotations_fill_with_classyvisions_gray():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    aug = SampleAugment(auto_augment="imagenet")
    corners = {tuple(aug(white, random.Random(s))[0, 0]) for s in range(150)}
    assert (128, 128, 128) in corners  # a rotation uncovered the corner: ClassyVision's MIDDLE_GRAY


def test_torchvision_imagenet_policy_is_classyvisions_plus_a_repeat():
    """Why torchvision's AutoAugment is not the recipe's op (beside rotation direction, shear resampling and the
    solarize threshold, classy_autoaugment.py): its IMAGENET list is ClassyVision's 24 sub-policies and a 25th,
    which repeats the third and so draws it twice as often."""
    from vit_accel.data.classy_autoaugment import IMAGENET_POLICY

    tv = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)._policies  # [((name, prob, magnitude index or None), ...)]
    assert len(tv) == 25 and tv[24] == tv[2]
    for ours, theirs in zip(tv[:24], IMAGENET_POLICY):
        for (name, prob, idx), (cv_name, cv_idx, cv_prob) in zip(ours, theirs):
            assert (name, prob) == (cv_name, cv_prob)
            assert idx is None or idx == cv_idx  # None: ops without magnitude (ClassyVision ignores its index)


def test_rand_augment_is_timms_under_the_sample_seed():
    img = _photo()
    aug = SampleAugment(rand_augment=RA, mean=MMP_MEAN, interpolation="bicubic", img_size=32)
    from timm.data.auto_augment import rand_augment_transform

    library = rand_augment_transform(RA, dict(translate_const=14, translate_pct=0.45, img_mean=(124, 116, 104),
                                              interpolation=Image.BICUBIC))
    assert [op.name for op in library.ops] == [op.name for op in aug.policy.ops]
    assert len(library.ops) == 15 and library.num_layers == 2 and aug.policy.ops[0].magnitude_std == 0.5
    outs = []
    for seed in range(30):
        out = aug(img, random.Random(seed))
        assert np.array_equal(out, aug(img, random.Random(seed)))
        with seeded_global_rngs(random.Random(seed).getrandbits(63)):
            try:
                expected = np.asarray(library(img))
            except ValueError as e:  # timm's own posterize at 0 bits under recent Pillow (see below)
                assert "bits" in str(e)
                continue
        assert np.array_equal(out, expected)
        outs.append(out.tobytes())
    assert len(set(outs)) > 20


def test_rand_augment_magnitude_zero_is_identity_for_every_magnitude_op():
    img = _photo(30, 24)
    ra = timm_rand_augment("rand-m0-mstd0-inc1", MMP_MEAN, "bicubic", 24)
    # posterize keeps 4 bits at magnitude 0 in the increasing scale; the other three have no magnitude
    not_identity = {"AutoContrast", "Equalize", "Invert", "PosterizeIncreasing"}
    for op in ra.ops:
        op.prob = 1.0
        same = np.array_equal(np.asarray(op(img)), np.asarray(img))
        assert same == (op.name not in not_identity), op.name
    # p0: no op ever applies, whatever the magnitude
    aug = SampleAugment(rand_augment="rand-m9-mstd0.5-inc1-p0")
    assert all(np.array_equal(aug(img, random.Random(s)), np.asarray(img)) for s in range(10))


def test_rand_augment_posterize_at_magnitude_10_is_black_not_a_crash():
    img = _photo()
    ra = timm_rand_augment("rand-m10-mstd0-inc1", MMP_MEAN)
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    assert not np.asarray(op(img)).any()  # 0 bits kept, as mmcv (mmpretrain) and older Pillow give


def test_parse_and_bad_rand_augment_strings():
    assert parse_rand_augment(RA) == {"m": 9, "mstd": 0.5, "inc": 1}
    assert parse_rand_augment("rand-m7-n3-p0.3-mmax12") == {"m": 7, "n": 3, "p": 0.3, "mmax": 12}
    with pytest.raises(ValueError, match="start with 'rand-'"):
        parse_rand_augment("randaugment-m9")
    with pytest.raises(ValueError, match="unknown section 'x9'; valid sections: m, n, p, mstd, mmax, inc"):
        parse_rand_augment("rand-m9-x9")
    with pytest.raises(ValueError, match="section 'm9.5' needs a value of type int"):
        parse_rand_augment("rand-m9.5")


# ----------------------------------------------------------------------------- random erasing

def test_random_erasing_follows_mmpretrains_rectangle_and_fill():
    black = np.zeros((40, 48, 3), np.uint8)
    assert random_erase(black, random.Random(0), 0.0, [200.7] * 3, [0.0] * 3) is black  # p 0: identity
    erased = 0
    for seed in range(300):
        out = random_erase(black, random.Random(seed), 1.0, [200.7, 300.0, -5.0], [0.0] * 3)
        assert np.array_equal(out, random_erase(black, random.Random(seed), 1.0, [200.7, 300.0, -5.0], [0.0] * 3))
        ys, xs = np.nonzero(out[..., 0])
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert len(ys) == h * w  # one rectangle
        # fill truncated toward zero (200.7 -> 200) and clipped to 0..255 (300 -> 255, -5 -> 0)
        assert (out[ys, xs] == [200, 255, 0]).all()
        area = h * w / (40 * 48)
        assert ERASE_AREA[0] * 0.8 <= area <= ERASE_AREA[1] * 1.2 or h == 40 or w == 48
        assert ERASE_ASPECT[0] * 0.7 <= h / w <= ERASE_ASPECT[1] / 0.7 or h == 40 or w == 48
        assert ys.max() < 39 or h == 40  # top < img_h - h: numpy's exclusive randint, as mmpretrain
        erased += 1
    assert erased == 300
    hits = sum(random_erase(black, random.Random(s), 0.25, [128] * 3, [1.0] * 3) is not black for s in range(2000))
    assert 0.22 < hits / 2000 < 0.28  # mmpretrain's erase_prob 0.25


def test_random_erasing_noise_is_normal_around_the_normalization_mean():
    grey = np.full((200, 200, 3), 7, np.uint8)
    fills = []
    for seed in range(40):
        out = random_erase(grey, random.Random(seed), 1.0, MMP_MEAN, MMP_STD)
        fills.append(out[(out != 7).any(-1)].astype(np.float64))
    fill = np.concatenate(fills)
    # int32 truncation lowers the mean by ~0.5; clipping at 0/255 barely matters 2 std from the mean
    assert np.allclose(fill.mean(0), np.array(MMP_MEAN) - 0.5, atol=1.5)
    assert np.allclose(fill.std(0), MMP_STD, rtol=0.05)


def test_sample_augment_chains_policy_then_erasing_from_one_seed():
    img = _photo()
    both = SampleAugment(rand_augment=RA, random_erasing=1.0, mean=MMP_MEAN, std=MMP_STD, img_size=32)
    only = SampleAugment(rand_augment=RA, mean=MMP_MEAN, img_size=32)
    for seed in range(5):
        rng = random.Random(seed)
        a = both(img, rng)
        rng2 = random.Random(seed)
        b = random_erase(only(img, rng2), rng2, 1.0, MMP_MEAN, MMP_STD)
        assert np.array_equal(a, b)
    assert not SampleAugment().enabled


def test_missing_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.transforms.v2", None)
    assert SampleAugment(auto_augment="imagenet").enabled     # ClassyVision's policy needs PIL only
    monkeypatch.setitem(sys.modules, "timm.data.auto_augment", None)
    with pytest.raises(DataError, match=r"rand_augment='rand-m9-mstd0.5-inc1' uses timm.*pip install 'vit-accel\[timm\]'"):
        SampleAugment(rand_augment=RA)
    monkeypatch.setitem(sys.modules, "timm.data.mixup", None)
    with pytest.raises(DataError, match=r"uses timm.*pip install 'vit-accel\[timm\]'"):
        BatchMix(10, 0.8, 1.0)


# ----------------------------------------------------------------------------- batch mixing

def _batch(n=8, size=12):
    images = torch.stack([torch.full((3, size, size), 20.0 * i, dtype=torch.float32) for i in range(n)])
    return images.to(torch.uint8), torch.arange(n) % 10


def test_batch_mix_is_timms_mixup_under_the_step_seed():
    images, labels = _batch()
    mix = BatchMix(10, 0.8, 1.0, smoothing=0.1, batch_size=8)
    for seed in range(20):
        x, t = mix(images, labels, seed)
        np.random.seed(seed % 2 ** 32)
        ref_x, ref_t = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)(
            images.float(), labels)
        assert torch.equal(x, ref_x) and torch.equal(t, ref_t)
        assert torch.equal(images, _batch()[0])  # the caller's batch is not mixed in place
    with pytest.raises(DataError, match="even batch"):
        BatchMix(10, 0.8, 1.0, batch_size=7)


def _kind(x, images):
    """Image 0 is all 0 and its partner (image 7) all 140: cutmix leaves two values in it, mixup one."""
    if torch.equal(x, images.float()):
        return "none"
    return "cutmix" if len(x[0].unique()) > 1 else "mixup"


@pytest.mark.parametrize("alphas,prob,switch,expect", [
    ((0.8, 1.0), 1.0, 0.5, {"mixup": 0.5, "cutmix": 0.5, "none": 0.0}),     # mmpretrain / timm
    ((0.8, 1.0), 0.5, 0.25, {"mixup": 0.375, "cutmix": 0.125, "none": 0.5}),
    ((0.2, 0.0), 1.0, 0.5, {"mixup": 1.0, "cutmix": 0.0, "none": 0.0}),     # ClassyVision
])
def test_batch_mix_selection_frequencies_and_targets(alphas, prob, switch, expect):
    images, labels = _batch()
    mix = BatchMix(10, alphas[0], alphas[1], prob, switch, smoothing=0.1)
    onehot = F.one_hot(labels, 10).float() * 0.9 + 0.01
    counts = dict.fromkeys(expect, 0)
    n = 400
    for seed in range(n):
        x, t = mix(images, labels, seed)
        kind = _kind(x, images)
        counts[kind] += 1
        assert torch.allclose(t.sum(1), torch.ones(8))
        if kind == "none":
            assert torch.allclose(t, onehot)
            continue
        if kind == "mixup":  # x = lam x + (1 - lam) x.flip(0): recover lam from two distinct images
            lam = ((x[0] - images[7].float()) / (images[0].float() - images[7].float())).mean().item()
        else:  # lam = 1 - the pasted area
            lam = 1.0 - (x[0] != images[0].float()).all(0).float().mean().item()
        assert torch.allclose(t, onehot * lam + onehot.flip(0) * (1 - lam), atol=1e-4)
    for kind, p in expect.items():
        assert abs(counts[kind] / n - p) < 0.07, counts


# ----------------------------------------------------------------------------- loss and settings

def test_soft_target_loss_matches_cross_entropy_and_timm():
    from timm.loss import SoftTargetCrossEntropy

    from vit_accel.backends.cpu import CPUBackend

    logits = torch.randn(6, 10)
    labels = torch.tensor([0, 3, 9, 2, 2, 5])
    soft = torch.softmax(torch.randn(6, 10), 1)
    for smoothing in (0.0, 0.1):
        ce = CPUBackend(load_recipe("vit-ti-digits", [f"optim.label_smoothing={smoothing}"]))
        sce = CPUBackend(load_recipe("vit-ti-digits", [f"optim.label_smoothing={smoothing}", "optim.loss=soft_ce"]))
        hard = sce.loss_fn(logits, labels)
        assert torch.allclose(hard, ce.loss_fn(logits, labels), atol=1e-6)
        assert torch.allclose(hard, F.cross_entropy(logits, labels, label_smoothing=smoothing), atol=1e-6)
        target = F.one_hot(labels, 10).float() * (1 - smoothing) + smoothing / 10
        assert torch.allclose(hard, SoftTargetCrossEntropy()(logits, target), atol=1e-6)
        # soft targets (mixup) carry their smoothing already: both losses leave them as they are
        assert torch.allclose(sce.loss_fn(logits, soft), SoftTargetCrossEntropy()(logits, soft), atol=1e-6)
        assert torch.allclose(ce.loss_fn(logits, soft), SoftTargetCrossEntropy()(logits, soft), atol=1e-6)


@pytest.mark.parametrize("override,message", [
    ("data.auto_augment=original", "data.auto_augment: 'original' is not one of '', 'imagenet'"),
    ("data.rand_augment=rand-m9-q2", "unknown section 'q2'; valid sections: m, n, p, mstd, mmax, inc"),
    ("data.random_erasing=1.5", "data.random_erasing is a probability in [0, 1], got 1.5"),
    ("data.mix_switch_prob=-0.1", "data.mix_switch_prob is a probability in [0, 1]"),
    ("data.mixup=-1", "data.mixup is a Beta alpha, >= 0"),
    ("optim.loss=focal", "optim.loss: 'focal' is not one of ce, soft_ce"),
])
def test_bad_settings_name_the_valid_values(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("vit-ti-digits", [override])
    assert message in str(e.value)


def test_auto_and_rand_augment_together_are_refused():
    with pytest.raises(ConfigError, match="both set"):
        load_recipe("vit-ti-digits", ["data.auto_augment=imagenet", f"data.rand_augment={RA}"])
    r = load_recipe("vit-ti-digits", [f"data.rand_augment={RA}", "data.random_erasing=0.25", "optim.loss=soft_ce"])
    assert (r.data.rand_augment, r.data.random_erasing, r.data.mix_prob, r.data.mix_switch_prob, r.optim.loss) == \
        (RA, 0.25, 1.0, 0.5, "soft_ce")


# ----------------------------------------------------------------------------- in the loader

@pytest.fixture(scope="module")
def shards4(tmp_path_factory):
    """4 shards x 16 JPEG photos, 5 classes."""
    import io

    from vit_accel.data import write_shards
    from vit_accel.data.shards import SourceSample

    def jpeg(i):
        out = io.BytesIO()
        _photo(48, 40, seed=i).save(out, "JPEG", quality=90)
        return out.getvalue()

    d = tmp_path_factory.mktemp("aug_shards")
    samples = [SourceSample("s%03d" % i, i % 5, "mem", data=jpeg(i)) for i in range(64)]
    write_shards(samples, str(d), "train", [str(c) for c in range(5)], samples_per_shard=16, log=lambda m: None)
    return str(d / "train.json")


@pytest.mark.parametrize("policy", [dict(rand_augment=RA, random_erasing=0.25), dict(auto_augment="imagenet")])
def test_loader_augments_per_sample_reproducibly_and_resumes_exactly(shards4, policy):
    from vit_accel.data import resolve_shards
    from vit_accel.data.loader import TrainLoader

    def make(workers, **kw):
        return TrainLoader(resolve_shards(shards4), 24, 8, seed=3, workers=workers, shuffle_buffer=8,
                           interpolation="bicubic", mean=MMP_MEAN, std=MMP_STD, **kw)

    def batches(loader, n, start=None):
        if start is not None:
            loader.load_state_dict(start)
        it = iter(loader)
        return [next(it)[0] for _ in range(n)]

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected_globals = _global_draws()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    ref = batches(make(0, **policy), 10)  # crosses into the second epoch (8 batches per epoch)
    assert _global_draws() == expected_globals  # the main process's generators are untouched
    plain = batches(make(0), 10)
    assert not all(torch.equal(a, b) for a, b in zip(ref, plain))
    assert all(torch.equal(a, b) for a, b in zip(ref, batches(make(0, **policy), 10)))
    # two worker processes: stopped after 3 batches and resumed from the state, the same 7 batches follow
    first = make(2, **policy)
    it = iter(first)
    head = [next(it)[0] for _ in range(3)]
    state = first.state_dict()
    tail = [next(it)[0] for _ in range(7)]
    resumed = batches(make(2, **policy), 7, start=state)
    assert all(torch.equal(a, b) for a, b in zip(tail, resumed)) and len(head + tail) == 10


def test_recipe_settings_reach_the_loader(shards4):
    from vit_accel.data import build_train_loader

    def first_batch(*overrides):
        r = load_recipe("vit-ti-digits", ["data.source=shards", f"data.train_shards={shards4}", "data.workers=0",
                                          "data.hflip=0.0"] + list(overrides))
        return next(iter(build_train_loader(r.data, 24, 8, seed=0)))[0]

    plain = first_batch()
    augmented = first_batch(f"data.rand_augment={RA}", "data.random_erasing=1.0")
    assert torch.equal(plain, first_batch()) and not torch.equal(plain, augmented)


def test_classyvision_label_smoothing_is_standard_smoothing_of_s_over_1_plus_s():
    """ClassyVision's label_smoothing_cross_entropy turns a (mixed) target t into (t + s/C) / (1 + s)."""
    images, labels = _batch()
    s, classes = 0.1, 10
    for seed in range(5):
        _, mixed = BatchMix(classes, 0.2, 0.0)(images, labels, seed)  # ClassyVision: mixup alpha 0.2
        classy = (mixed + s / classes) / (1 + s)
        _, ours = BatchMix(classes, 0.2, 0.0, smoothing=s / (1 + s))(images, labels, seed)
        assert torch.allclose(classy, ours, atol=1e-6)


@pytest.mark.parametrize("policy", [dict(auto_augment="imagenet"),
                                    dict(rand_augment=RA, random_erasing=0.5, mean=MMP_MEAN, std=MMP_STD)])
def test_augmenting_into_a_batch_slot_gives_the_pixels_of_the_array_form(policy):
    """The loader's form (uint8 [3, H, W] tensor in, written into the batch slot) draws and computes
    exactly what the array form does, which the tests above hold against the libraries."""
    img = _photo(48, 40)
    chw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
    aug = SampleAugment(img_size=40, **policy)
    outs = set()
    for seed in range(12):
        out = torch.empty_like(chw)
        aug.into(chw, random.Random(seed), out)
        ref = aug(img, random.Random(seed))
        assert np.array_equal(out.permute(1, 2, 0).numpy(), ref)
        outs.add(ref.tobytes())
    assert len(outs) > 6  # the draws differ by seed
