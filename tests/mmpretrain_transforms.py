"""mmpretrain 1.x's RandAugment ('timm_increasing') and RandomErasing, kept as test fixtures.

Source: open-mmlab/mmpretrain at ee7f2e88 (the 1.x line), ``mmpretrain/datasets/transforms/
auto_augment.py`` (RandAugment, BaseAugTransform and its ops, RANDAUG_POLICIES['timm_increasing'])
and ``processing.py`` (RandomErasing); Apache License 2.0, Copyright (c) OpenMMLab. The recipe
vit-b16-scratch configures them in ``configs/_base_/datasets/imagenet_bs64_swin_224.py``.

Why a fixture: mmpretrain 1.x needs mmcv 2.x, which installs under the same import name as the
mmcv 1.7.2 whose runner tests/test_schedule_sources.py drives, so the two cannot share an
environment. The transforms' semantics are written here, draw for draw from numpy's global
generator in the source's order; the image operations they call are mmcv's own, from mmcv 1.7.2
(``mmcv/image/geometric.py`` and ``photometric.py``, which mmcv 2.2.0 keeps but for imports,
type hints and docstrings: ``git diff v1.7.2 v2.2.0`` in open-mmlab/mmcv). mmpretrain works on
BGR arrays (cv2 decoding); the functions here take and return RGB, as the loader's crops are.
"""
import math

import numpy as np

mmcv = __import__("mmcv")

# name, magnitude_range (None: no magnitude), signed (random_negative), RANDAUG_POLICIES['timm_increasing'] order
TIMM_INCREASING = [
    ("AutoContrast", None, False), ("Equalize", None, False), ("Invert", None, False),
    ("Rotate", (0, 30), True), ("Posterize", (4, 0), False), ("Solarize", (256, 0), False),
    ("SolarizeAdd", (0, 110), False), ("ColorTransform", (0, 0.9), True), ("Contrast", (0, 0.9), True),
    ("Brightness", (0, 0.9), True), ("Sharpness", (0, 0.9), True), ("ShearX", (0, 0.3), True),
    ("ShearY", (0, 0.3), True), ("TranslateX", (0, 0.45), True), ("TranslateY", (0, 0.45), True),
]


def apply_op(bgr, name, magnitude, pad_val, interpolation):
    """One op with its magnitude already drawn, signed and mapped (BaseAugTransform's result)."""
    if name == "AutoContrast":
        return mmcv.auto_contrast(bgr)
    if name == "Equalize":
        return mmcv.imequalize(bgr)
    if name == "Invert":
        return mmcv.iminvert(bgr)
    if name == "Rotate":
        return mmcv.imrotate(bgr, magnitude, border_value=pad_val, interpolation=interpolation)
    if name == "Posterize":
        return mmcv.posterize(bgr, bits=math.ceil(magnitude))
    if name == "Solarize":
        return mmcv.solarize(bgr, thr=magnitude)
    if name == "SolarizeAdd":
        return np.where(bgr < 128, np.minimum(bgr + magnitude, 255), bgr)
    if name == "ColorTransform":
        return mmcv.adjust_color(bgr, alpha=1 + magnitude)
    if name == "Contrast":
        return mmcv.adjust_contrast(bgr, factor=1 + magnitude)
    if name == "Brightness":
        return mmcv.adjust_brightness(bgr, factor=1 + magnitude)
    if name == "Sharpness":
        return mmcv.adjust_sharpness(bgr, factor=1 + magnitude)
    direction = "horizontal" if name.endswith("X") else "vertical"
    if name.startswith("Shear"):
        return mmcv.imshear(bgr, magnitude, direction=direction, border_value=pad_val, interpolation=interpolation)
    offset = magnitude * bgr.shape[1 if direction == "horizontal" else 0]
    return mmcv.imtranslate(bgr, offset, direction=direction, border_value=pad_val, interpolation=interpolation)


def rand_augment(rgb, mean_rgb, num_policies=2, magnitude_level=9, magnitude_std=0.5, total_level=10, prob=0.5,
                 interpolation="bicubic"):
    """RandAugment(policies='timm_increasing', ..., hparams=dict(pad_val=[round(x) for x in bgr_mean],
    interpolation='bicubic')) on a uint8 RGB array: the merged hparams give every geometric op the pad
    value and the interpolation (Shear, Translate and Rotate all take ``interpolation``)."""
    pad_val = tuple(round(x) for x in mean_rgb[::-1])
    img = np.ascontiguousarray(rgb[..., ::-1])
    for i in np.random.choice(np.arange(len(TIMM_INCREASING)), size=num_policies).tolist():
        name, span, signed = TIMM_INCREASING[i]
        if np.random.rand() > prob:                              # random_disable
            continue
        magnitude = None
        if span is not None:                                     # random_magnitude
            level = magnitude_level
            if magnitude_std > 0:
                level = np.clip(np.random.normal(level, magnitude_std), 0, total_level)
            magnitude = (level / total_level) * (span[1] - span[0]) + span[0]
            if signed and np.random.rand() < 0.5:                # random_negative
                magnitude = -magnitude
        img = apply_op(img, name, magnitude, pad_val, interpolation).astype(np.uint8)
    return np.ascontiguousarray(img[..., ::-1])


def random_erasing(rgb, erase_prob=0.25, min_area_ratio=0.02, max_area_ratio=1 / 3, aspect_range=(3 / 10, 10 / 3),
                   fill_color=(123.675, 116.28, 103.53), fill_std=(58.395, 57.12, 57.375)):
    """RandomErasing(mode='rand') with a normal fill of ``fill_color`` / ``fill_std`` (per channel of the
    array it is given): the switch, the log-aspect (float32 bounds), the area, top, left, then the fill."""
    if np.random.rand() > erase_prob:                            # random_disable
        return rgb
    img_h, img_w = rgb.shape[:2]
    log_aspect_range = np.log(np.array(aspect_range, dtype=np.float32))
    aspect_ratio = np.exp(np.random.uniform(*log_aspect_range))
    area = img_h * img_w * np.random.uniform(min_area_ratio, max_area_ratio)
    h = min(int(round(np.sqrt(area * aspect_ratio))), img_h)
    w = min(int(round(np.sqrt(area / aspect_ratio))), img_w)
    top = np.random.randint(0, img_h - h) if img_h > h else 0
    left = np.random.randint(0, img_w - w) if img_w > w else 0
    out = rgb.copy()
    patch = np.random.normal(fill_color, fill_std, (h, w, 3))
    out[top:top + h, left:left + w] = np.clip(patch.astype(np.int32), 0, 255).astype(np.uint8)
    return out
