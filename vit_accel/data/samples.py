"""One sample from a shard record to (image, label), and the bad-sample rule every reader applies.

A sample whose image is missing or does not decode, or whose label is missing or out of
range, is skipped, counted and recorded as (key, shard, reason). A reader raises DataError
when its bad count exceeds both BAD_SAMPLE_GRACE (10) and max_bad_fraction x samples it has
seen; max_bad_fraction=0 tolerates none. The loaders apply the same rule to the counts of a
whole rank. Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from .reader import IMAGE_KEYS, DataError, Record
from .transforms import DecodeError

BAD_SAMPLE_GRACE = 10
_MAX_EXAMPLES = 20


def identity(x: Any) -> Any:
    """A DataLoader collate_fn for readers that yield whole batches (picklable, unlike a lambda)."""
    return x


def too_many_bad(bad: int, seen: int, max_fraction: float) -> bool:
    """The bad-sample rule: more than the grace count and more than the allowed fraction."""
    if max_fraction <= 0:
        return bad > 0
    return bad > BAD_SAMPLE_GRACE and bad > max_fraction * seen


def bad_sample_error(bad: int, seen: int, max_fraction: float, examples: Sequence[Sequence[str]],
                     where: str) -> DataError:
    shown = "; ".join("%s in %s: %s" % tuple(e) for e in list(examples)[:5])
    return DataError("%d of %d samples seen %s were bad (%.4f > data.max_bad_fraction=%g). Examples: %s"
                     % (bad, seen, where, bad / max(seen, 1), max_fraction, shown))


class BadSampleStats:
    """Samples seen and skipped as bad, with up to 20 (key, shard, reason) examples."""

    def __init__(self) -> None:
        self.seen, self.bad, self.examples = 0, 0, []  # type: int, int, List[Tuple[str, str, str]]

    def add(self, seen: int, bad: int, examples: Sequence[Sequence[str]]) -> None:
        self.seen += seen
        self.bad += bad
        room = _MAX_EXAMPLES - len(self.examples)
        self.examples.extend(tuple(e) for e in list(examples)[:max(room, 0)])

    def __repr__(self) -> str:
        return "BadSampleStats(seen=%d, bad=%d)" % (self.seen, self.bad)


class ReaderTally:
    """One reader's running counts (since the run started) and the bad samples not yet reported."""

    def __init__(self, max_fraction: float, where: str, seen: int = 0, bad: int = 0):
        self.max_fraction, self.where = max_fraction, where
        self.seen, self.bad = seen, bad
        self.new_bad = []  # type: List[Tuple[str, str, str]]

    def skip(self, rec: Record, reason: str) -> None:
        """Count a bad sample; DataError once the reader has seen too many."""
        self.bad += 1
        self.new_bad.append((rec.key, rec.shard, reason))
        if too_many_bad(self.bad, self.seen, self.max_fraction):
            raise bad_sample_error(self.bad, self.seen, self.max_fraction, self.new_bad, self.where)

    def take_new_bad(self) -> List[Tuple[str, str, str]]:
        out, self.new_bad = self.new_bad, []
        return out


def _image_and_label(rec: Record, num_classes: Optional[int]) -> Tuple[Optional[bytes], int, str]:
    """(image bytes, label, "") or (None, -1, reason) for a structurally bad sample."""
    image = next((rec.files[k] for k in IMAGE_KEYS if k in rec.files), None)
    if image is None:
        return None, -1, "no image member (%s)" % "/".join(IMAGE_KEYS)
    if "cls" not in rec.files:
        return None, -1, "missing label (.cls)"
    try:
        label = int(rec.files["cls"].strip())
    except ValueError:
        return None, -1, "label is not an integer: %r" % rec.files["cls"][:20]
    if label < 0 or (num_classes is not None and label >= num_classes):
        return None, -1, "label %d outside 0..%d" % (label, (num_classes or 0) - 1)
    return image, label, ""


def decode_sample(rec: Record, num_classes: Optional[int],
                  transform: Callable[[bytes], np.ndarray]) -> Tuple[Optional[np.ndarray], int, str]:
    """(transformed HWC uint8 image, label, "") or (None, -1, reason) for a bad sample."""
    data, label, reason = _image_and_label(rec, num_classes)
    if data is None:
        return None, -1, reason
    try:
        return transform(data), label, ""
    except DecodeError as e:
        return None, -1, str(e)


class Opts:
    """Everything a reader process needs; plain data so it pickles under spawn too."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
