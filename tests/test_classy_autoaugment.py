"""`data.auto_augment: imagenet` against ClassyVision 0.7.0's own ``imagenet_autoaugment``.

ClassyVision's module builds every op's magnitude table with ``np.int``, which numpy 1.24 removed;
the fixture gives it back (``int``, what the alias was) so the source's code runs unchanged here.
"""
import random

import numpy as np
import pytest
from PIL import Image

from vit_accel.data import SampleAugment
from vit_accel.data.augment import seeded_global_rngs
from vit_accel.data.classy_autoaugment import IMAGENET_POLICY, OPS, ImagenetAutoAugment, apply_op

classy = pytest.importorskip("classy_vision.dataset.transforms.autoaugment",
                             reason="ClassyVision is a test oracle ('.[test]')")

# ClassyVision's op functions by name (its ImageOp enum names, as ours)
NAMES = {"shear_x": "ShearX", "shear_y": "ShearY", "translate_x": "TranslateX", "translate_y": "TranslateY",
         "rotate_with_fill": "Rotate", "color": "Color", "posterize": "Posterize", "solarize": "Solarize",
         "contrast": "Contrast", "sharpness": "Sharpness", "brightness": "Brightness",
         "auto_contrast": "AutoContrast", "equalize": "Equalize", "invert": "Invert"}


@pytest.fixture
def source(monkeypatch):
    monkeypatch.setattr(np, "int", int, raising=False)
    return classy


def _photos():
    """Photo-like content (smooth, every level used) in two shapes; odd sizes catch off-by-one geometry."""
    out = []
    for seed, (w, h) in enumerate([(41, 33), (64, 48)]):
        rng = np.random.RandomState(seed)
        small = (rng.rand(h // 4, w // 4, 3) * 255).astype(np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    return out


def test_every_op_at_every_level_and_sign_gives_classyvisions_pixels(source):
    for op in source.ImageOp:
        settings = source.get_image_op_settings(op)
        name = NAMES[getattr(settings.function, "func", settings.function).__name__]
        assert list(np.asarray(settings.ranges, dtype=float)) == list(np.asarray(OPS[name][0], dtype=float)), name
        for img in _photos():
            for level in range(10):
                for seed in (0, 1, 2, 3):             # both signs of the signed ops
                    random.seed(seed)
                    theirs = np.asarray(settings.function(img, settings.ranges[level]))
                    random.seed(seed)
                    ours = np.asarray(apply_op(img, name, level))
                    assert np.array_equal(ours, theirs), (name, level, seed)


def test_the_policy_is_classyvisions_24_sub_policies(source):
    theirs = source.ImagenetAutoAugment().policies
    assert len(theirs) == len(IMAGENET_POLICY) == 24
    for sub, ((n1, l1, p1), (n2, l2, p2)) in zip(theirs, IMAGENET_POLICY):
        for fn, mag, prob, (name, level, p) in ((sub.operation1, sub.magnitude1, sub.p1, (n1, l1, p1)),
                                                (sub.operation2, sub.magnitude2, sub.p2, (n2, l2, p2))):
            assert NAMES[getattr(fn, "func", fn).__name__] == name and prob == p
            assert float(mag) == float(OPS[name][0][level])


def test_the_whole_transform_draws_as_classyvision_under_the_same_seed(source):
    """Sub-policy, probabilities and signs in ClassyVision's order from python's random: equal pixels."""
    theirs, ours = source.ImagenetAutoAugment(), ImagenetAutoAugment()
    changed = 0
    for img in _photos():
        for seed in range(150):
            random.seed(seed)
            want = np.asarray(theirs(img))
            random.seed(seed)
            got = np.asarray(ours(img))
            assert np.array_equal(got, want), seed
            changed += not np.array_equal(got, np.asarray(img))
    assert changed > 150


def test_the_recipes_key_runs_it_under_the_sample_seed(source):
    """`data.auto_augment: imagenet` in the loader: SampleAugment seeds python's random from the sample's
    generator around the call; the crop comes out as ClassyVision's transform leaves it."""
    aug = SampleAugment(auto_augment="imagenet")
    img = _photos()[0]
    for seed in range(30):
        out = aug(img, random.Random(seed))
        with seeded_global_rngs(random.Random(seed).getrandbits(63)):   # the draw SampleAugment makes first
            want = np.asarray(source.ImagenetAutoAugment()(img))
        assert out.dtype == np.uint8 and np.array_equal(out, want)


def test_rotations_turn_counter_clockwise_only_and_fill_middle_gray():
    """What torchvision's AutoAugment does otherwise: it rotates either way and fills with its own value."""
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    arrow = Image.new("RGB", (32, 32))
    arrow.paste((255, 255, 255), (16, 14, 32, 18))         # a bar from the center to the right edge
    outs = set()
    for seed in range(10):
        random.seed(seed)
        outs.add(np.asarray(apply_op(arrow, "Rotate", 9)).tobytes())
        random.seed(seed)
        assert tuple(np.asarray(apply_op(white, "Rotate", 9))[0, 0]) == (128, 128, 128)
    assert len(outs) == 1                                   # no sign drawn: one direction
    turned = np.asarray(apply_op(arrow, "Rotate", 9))
    assert turned[:16, 16:].sum() > turned[16:, 16:].sum()  # 30 degrees counter-clockwise: the bar points up-right
