"""vit-b16-scratch's per-sample augmentations against mmpretrain 1.x's (tests/mmpretrain_transforms.py,
whose image operations are mmcv's own).

Random erasing is this package's own op written to mmpretrain's semantics: on fixed parameters (the
same uniforms, offsets and fill generator fed to both) the erased crops are equal.

RandAugment runs timm's ops (the recipe's ``rand-m9-mstd0.5-inc1``), a library op whose semantics
differ from mmpretrain's; the recipe documents the difference, and this is its size. The policy is
the same (the 15 'timm_increasing' ops, 2 drawn with replacement, each applied with probability 0.5
at magnitude N(9, 0.5) clipped to 0..10, the same magnitude -> argument maps). The ops: timm turns,
shears and shifts the other way for the same sign (both draw the sign with probability 0.5, so the
distributions agree) and resamples with PIL where mmcv uses OpenCV; at equal geometry the pixels
differ by the amounts below, and the photometric ops but color and sharpness are equal. Corpus:
64 x 64 crops of scikit-learn's two sample photographs.
"""
import random

import numpy as np
import pytest
from PIL import Image

import mmpretrain_transforms as mmp
from vit_accel.data import SampleAugment
from vit_accel.data.augment import ERASE_AREA, ERASE_ASPECT, random_erase

pytest.importorskip("mmcv", reason="mmcv 1.x is a test oracle (make test installs it)")
timm_aa = pytest.importorskip("timm.data.auto_augment", reason="RandAugment comes from timm")

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
RA = "rand-m9-mstd0.5-inc1"
# timm op -> mmpretrain policy name, and whether mmcv's geometry runs the other way for the same sign
TIMM_TO_MMP = {"AutoContrast": "AutoContrast", "Equalize": "Equalize", "Invert": "Invert", "Rotate": "Rotate",
               "PosterizeIncreasing": "Posterize", "SolarizeIncreasing": "Solarize", "SolarizeAdd": "SolarizeAdd",
               "ColorIncreasing": "ColorTransform", "ContrastIncreasing": "Contrast",
               "BrightnessIncreasing": "Brightness", "SharpnessIncreasing": "Sharpness", "ShearX": "ShearX",
               "ShearY": "ShearY", "TranslateXRel": "TranslateX", "TranslateYRel": "TranslateY"}
MIRRORED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
# mean |pixel difference| (0..255) at magnitude 9, each op at equal geometry: the documented size
OP_DIFFERENCE = {"Rotate": 2.0, "ShearX": 2.0, "ShearY": 2.0, "TranslateX": 0.6, "TranslateY": 0.6,
                 "ColorTransform": 0.5, "Sharpness": 0.75, "Contrast": 0.05}


@pytest.fixture(scope="module")
def corpus():
    from sklearn.datasets import load_sample_images

    crops = []
    for photo in load_sample_images().images:                    # 427 x 640 photographs
        for y in range(0, 400, 100):
            for x in range(0, 600, 150):
                crops.append(np.asarray(Image.fromarray(photo[y:y + 100, x:x + 100]).resize((64, 64), Image.BICUBIC)))
    return crops


# ----------------------------------------------------------------------------- random erasing

class _Scripted(random.Random):
    """A generator that replays given draws in the order random_erase makes them."""

    def __init__(self, uniforms, ints, bits):
        super().__init__(0)
        self.uniforms, self.ints, self.bits = list(uniforms), list(ints), bits

    def random(self):
        return self.uniforms.pop(0)

    def randrange(self, start, stop=None, step=1):
        value = self.ints.pop(0)
        assert start <= value < stop
        return value

    def getrandbits(self, k):
        return self.bits


def test_random_erasing_is_mmpretrains_on_fixed_parameters(monkeypatch, corpus):
    """The same switch, aspect and area uniforms, the same offsets and the same fill generator to both."""
    draws = np.random.RandomState(0)
    erased = 0
    for k in range(300):
        img = corpus[k % len(corpus)]
        u_switch, u_aspect, u_area = draws.rand(3)
        u_switch *= 0.3
        seed = int(draws.randint(2 ** 31))
        # the box both compute from the uniforms; the offsets drawn inside the room it leaves
        state = {}

        def uniform(low=0.0, high=1.0, size=None, _u=[u_aspect, u_area]):
            return low + (high - low) * _u.pop(0)

        def randint(low, high=None, size=None):
            value = int(draws.randint(low, high))
            state.setdefault("ints", []).append(value)
            return value

        monkeypatch.setattr(np.random, "rand", lambda *a: u_switch)
        monkeypatch.setattr(np.random, "uniform", uniform)
        monkeypatch.setattr(np.random, "randint", randint)
        monkeypatch.setattr(np.random, "normal", lambda loc, scale, size: np.random.default_rng(seed).normal(
            loc, scale, size))
        want = mmp.random_erasing(img)
        monkeypatch.undo()
        got = random_erase(img, _Scripted([u_switch, u_aspect, u_area], state.get("ints", []), seed), 0.25, MEAN, STD,
                           area=ERASE_AREA, aspect=ERASE_ASPECT)
        assert np.array_equal(got, want), k
        erased += got is not img
    assert 60 < erased < 300        # the switch at 0.25 of uniforms in [0, 0.3)


# ----------------------------------------------------------------------------- RandAugment: the policy

def test_rand_augment_policy_is_mmpretrains(corpus):
    """The recipe's timm RandAugment holds mmpretrain's 15 policies in its order, 2 per image, probability
    0.5 each, magnitude 9 with std 0.5 clipped to 10; each maps magnitude 9 to mmpretrain's argument."""
    aug = SampleAugment(rand_augment=RA, mean=MEAN, interpolation="bicubic", img_size=64)
    ra = aug.policy
    assert [TIMM_TO_MMP[op.name] for op in ra.ops] == [
        name if not name.startswith(("Shear", "Translate")) else name for name, _, _ in mmp.TIMM_INCREASING]
    assert ra.num_layers == 2 and ra.choice_weights is None   # with replacement, as np.random.choice(size=2)
    for op, (name, span, _) in zip(ra.ops, mmp.TIMM_INCREASING):
        assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max or 10) == (0.5, 9, 0.5, 10)
        if span is None:
            continue
        theirs = (9 / 10) * (span[1] - span[0]) + span[0]
        ours = _positive_level_args(op, 9)[0]
        if name == "Posterize":
            theirs = int(np.ceil(theirs))
        elif name in ("ColorTransform", "Contrast", "Brightness", "Sharpness"):
            theirs = 1 + theirs                                  # timm's enhance factor
        elif name == "Solarize":                                 # timm thresholds an int: the same pixels invert
            assert ours == int(np.ceil(theirs)) - 0 or ours == int(theirs) + 1
            continue
        assert ours == pytest.approx(theirs), name


def _positive_level_args(op, magnitude):
    """timm's arguments for an op at a magnitude, its random sign fixed to + (timm's _randomly_negate off)."""
    negate = timm_aa._randomly_negate
    timm_aa._randomly_negate = lambda v: v
    try:
        return op.level_fn(magnitude, op.hparams) if op.level_fn else ()
    finally:
        timm_aa._randomly_negate = negate


# ----------------------------------------------------------------------------- RandAugment: the ops

@pytest.mark.parametrize("timm_name", list(TIMM_TO_MMP))
def test_each_rand_augment_op_differs_from_mmpretrains_by_the_documented_size(timm_name, corpus):
    ra = SampleAugment(rand_augment=RA, mean=MEAN, interpolation="bicubic", img_size=64).policy
    op = next(o for o in ra.ops if o.name == timm_name)
    name = TIMM_TO_MMP[timm_name]
    span = next(s for n, s, _ in mmp.TIMM_INCREASING if n == name)
    magnitude = None if span is None else (9 / 10) * (span[1] - span[0]) + span[0]
    if name in MIRRORED:
        magnitude = -magnitude                                   # mmcv's positive angle / offset is timm's negative
    pad = tuple(round(x) for x in MEAN[::-1])
    diffs = []
    for img in corpus:
        ours = np.asarray(op.aug_fn(Image.fromarray(img), *_positive_level_args(op, 9), **op.kwargs), np.float64)
        theirs = mmp.apply_op(np.ascontiguousarray(img[..., ::-1]), name, magnitude, pad, "bicubic")[..., ::-1]
        diffs.append(np.abs(ours - theirs.astype(np.float64)).mean())
    assert float(np.mean(diffs)) <= OP_DIFFERENCE.get(name, 0.0), (name, float(np.mean(diffs)))


def test_the_pipelines_change_the_corpus_alike(corpus):
    """Whole RandAugment, each under its own generator: how far the augmented crops move from the originals
    and where their pixel statistics land agree to a few percent (600 draws per pipeline)."""
    aug = SampleAugment(rand_augment=RA, mean=MEAN, interpolation="bicubic", img_size=64)
    np.random.seed(0)
    ours, theirs = [], []
    for k in range(600):
        img = corpus[k % len(corpus)]
        ours.append(aug(Image.fromarray(img), random.Random(k)).astype(np.float64))
        theirs.append(mmp.rand_augment(img, MEAN).astype(np.float64))
    originals = [corpus[k % len(corpus)].astype(np.float64) for k in range(600)]

    def stats(outs):
        moved = np.mean([np.abs(o - i).mean() for o, i in zip(outs, originals)])
        return moved, np.mean([o.mean() for o in outs]), np.mean([o.std() for o in outs])

    (m1, mean1, std1), (m2, mean2, std2) = stats(ours), stats(theirs)
    assert abs(m1 - m2) <= 0.1 * m2, (m1, m2)
    assert abs(mean1 - mean2) <= 4.0 and abs(std1 - std2) <= 3.0, (mean1, mean2, std1, std2)
