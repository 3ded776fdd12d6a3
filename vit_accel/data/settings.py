"""The data section's augmentation and decode settings, checked without torch or numpy (config.py's
recipe checks call them, so `vit-accel configs` and a recipe's errors answer without loading torch).
Python 3.8 compatible: the IPU path imports it."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence

DECODE_PLACES = ("cpu", "gpu")
AUTO_AUGMENT_POLICIES = ("", "imagenet")
# timm's RandAugment string sections this package accepts (timm also has 't', a transform-set name)
RAND_AUGMENT_SECTIONS = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int}
RAND_AUGMENT_FORM = "rand-m<int>[-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc<0|1>], e.g. rand-m9-mstd0.5-inc1"


def parse_rand_augment(spec: str) -> Dict[str, Any]:
    """Sections of a timm RandAugment string -> {"m": 9, "mstd": 0.5, ...}; ValueError names the form."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError("data.rand_augment %r must start with 'rand-'; form: %s" % (spec, RAND_AUGMENT_FORM))
    out = {}  # type: Dict[str, Any]
    for part in parts[1:]:
        m = re.match(r"(\D*)(.*)$", part)  # the name runs up to the first digit, as timm splits it
        key = m.group(1)
        if key not in RAND_AUGMENT_SECTIONS:
            raise ValueError("data.rand_augment %r: unknown section %r; valid sections: %s (form: %s)"
                             % (spec, part, ", ".join(RAND_AUGMENT_SECTIONS), RAND_AUGMENT_FORM))
        try:
            out[key] = RAND_AUGMENT_SECTIONS[key](m.group(2))
        except ValueError:
            raise ValueError("data.rand_augment %r: section %r needs a value of type %s (form: %s)"
                             % (spec, part, RAND_AUGMENT_SECTIONS[key].__name__, RAND_AUGMENT_FORM)) from None
    return out


def check_auto_augment(name: str) -> None:
    """ValueError unless `name` is a data.auto_augment policy this package has."""
    if name not in AUTO_AUGMENT_POLICIES:
        raise ValueError("data.auto_augment: %r is not one of %s" % (name, ", ".join(
            repr(p) for p in AUTO_AUGMENT_POLICIES)))


def check_augment_settings(d: Any) -> None:
    """Validate a data section's augmentation keys (and data.decode against them); ValueError
    with the key and the valid values."""
    check_auto_augment(d.auto_augment)
    if d.rand_augment:
        parse_rand_augment(d.rand_augment)
        if d.auto_augment:
            raise ValueError("data.auto_augment and data.rand_augment are both set; no source applies both: "
                             "set one of them to \"\"")
    for key in ("random_erasing", "mix_prob", "mix_switch_prob"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            raise ValueError("data.%s is a probability in [0, 1], got %r" % (key, getattr(d, key)))
    for key in ("mixup", "cutmix"):
        if getattr(d, key) < 0:
            raise ValueError("data.%s is a Beta alpha, >= 0 (0 = off), got %r" % (key, getattr(d, key)))
    check_decode_place(getattr(d, "decode", "cpu"), ["data.%s" % k for k in ("auto_augment", "rand_augment",
                                                                              "random_erasing") if getattr(d, k)])


def check_decode_place(decode: str, augment_keys: Optional[Sequence[str]] = None) -> None:
    """ValueError for an unknown data.decode, or data.decode=gpu with per-sample augmentations."""
    if decode not in DECODE_PLACES:
        raise ValueError("data.decode must be one of %s, got %r" % (", ".join(DECODE_PLACES), decode))
    if decode == "gpu" and augment_keys:
        raise ValueError("data.decode=gpu decodes and crops on the device, but %s run in the loader workers on "
                         "decoded pixels: use data.decode=cpu with them" % ", ".join(augment_keys))
