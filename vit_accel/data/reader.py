"""Finding shards, reading tar records, and the deterministic plan of who reads what.

Shard specs (a manifest, a folder, tar paths, a URL or `pipe:` command) resolve in specs.py.

A sample is a run of consecutive tar members sharing a key (the member name up to the
first dot of its last path component: webdataset's rule). Hidden members (`._x`, `.x`)
are ignored.

Python 3.8 compatible.
"""
from __future__ import annotations

import heapq
import os
import random
import re
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from ..errors import InputError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
_WANTED_EXTS = frozenset(IMAGE_KEYS + ("cls",))
_KEY_RE = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


class DataError(InputError):
    """The input data cannot be used: too many bad samples, a corrupt shard, a bad layout.

    Takes one message argument so DataLoader workers can re-raise it in the main process.
    """


class ResumeMismatch(DataError):
    """A saved loader state was made with other settings; ``changes`` lists them
    ("workers 2 -> 4", ...) so a caller can word its own advice."""

    def __init__(self, message: str, changes: List[str] = ()):
        super().__init__(message)
        self.changes = list(changes)


class ShardList(NamedTuple):
    urls: List[str]
    counts: List[int]            # samples per shard (from the manifest, or scanned)
    classes: Optional[List[str]]
    source: str                  # the spec, for messages
    sizes: List[int]             # bytes per shard from the manifest (-1: unknown / not checked)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


class Record(NamedTuple):
    key: str
    shard: str
    files: Dict[str, bytes]      # extension -> bytes (images and cls only)


# ----------------------------------------------------------------------------- spec resolution

def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", url)) and \
        not url.startswith("file://")


def local_path(url: str) -> str:
    return re.sub(r"^file://", "", url)


# ----------------------------------------------------------------------------- tar records

class TarStream:
    """Sequential tar member reader: ustar, GNU long names and pax `path`/`size` records.

    Python's tarfile costs about 0.25 ms per sample here (a TarInfo and a file object per
    member); this reads each 512-byte header itself, checks its checksum (so a damaged
    header is an error, not a silent end of archive as in tarfile), reads only the data
    asked for, and seeks over the rest when the source is a local file.
    """

    def __init__(self, stream: Any, url: str, seekable: bool):
        self.stream, self.url, self.seekable = stream, url, seekable
        self.offset = 0          # byte offset of the next header
        self.members = 0
        self._pending = 0        # unread data + padding of the current member
        self._size = 0

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        while len(data) < n:  # pipes return short reads
            more = self.stream.read(n - len(data))
            if not more:
                break
            data += more
        self.offset += len(data)
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            self.stream.seek(n, 1)
            self.offset += n
        else:
            while n > 0:
                got = len(self._read(min(n, 1 << 20)))
                if got == 0:
                    raise self._error("truncated inside member data")
                n -= got

    def _error(self, what: str) -> DataError:
        return DataError("shard %s is corrupt or truncated: %s at byte %d (after %d members)"
                         % (self.url, what, self.offset, self.members))

    def next_member(self) -> Optional[Tuple[str, bool]]:
        """(name, is a regular file) of the next member, or None at the end of the archive."""
        self._skip(self._pending)
        self._pending = 0
        long_name = None  # type: Optional[str]
        pax_size = None  # type: Optional[int]
        while True:
            header = self._read(512)
            if len(header) < 512:
                raise self._error("no end-of-archive blocks" if not header else "cut inside a header")
            if header.count(0) == 512:
                return None
            stored = header[148:156].replace(b"\0", b" ").strip()
            unsigned = sum(header[:148]) + sum(header[156:]) + 256
            # Some old writers summed signed chars: accept either sum.
            if not stored or int(stored, 8) != unsigned and int(stored, 8) != unsigned - 256 * sum(
                    1 for b in header[:148] + header[156:] if b > 127):
                raise self._error("bad tar header checksum")
            size = self._field_size(header[124:136])
            kind = header[156:157]
            padded = (size + 511) // 512 * 512
            if kind in (b"x", b"L", b"g"):  # metadata for the following member
                data = self._read(padded)[:size]
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    for key, value in _pax_records(data):
                        if key == "path":
                            long_name = value
                        elif key == "size":
                            pax_size = int(value)
                continue
            if pax_size is not None:
                size, padded = pax_size, (pax_size + 511) // 512 * 512
            name = long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if prefix:
                        name = prefix + "/" + name
            self.members += 1
            self._size, self._pending = size, padded
            return name, kind in (b"0", b"\0", b"7")

    def read_data(self) -> bytes:
        """The current member's data (once, right after next_member)."""
        data = self._read(self._size)
        if len(data) < self._size:
            raise self._error("cut inside member data")
        self._pending -= self._size
        self._size = 0
        return data

    @staticmethod
    def _field_size(field: bytes) -> int:
        if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
            return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        text = field.replace(b"\0", b" ").strip()
        return int(text, 8) if text else 0


def _pax_records(data: bytes) -> Iterator[Tuple[str, str]]:
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            return
        length = int(data[pos:space])
        if length <= 0:
            return
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        yield key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        pos += length


def _open_shard(url: str) -> Tuple[Any, bool]:
    try:
        if is_remote(url):
            from webdataset.gopen import gopen

            return gopen(url, "rb"), False
        return open(local_path(url), "rb"), True
    except (OSError, ValueError) as e:
        raise DataError("cannot open shard %s: %s: %s" % (url, type(e).__name__, e)) from None


def iter_records(url: str, want: Optional[Callable[[int], bool]] = None) -> Iterator[Tuple[int, Optional[Record]]]:
    """(index within the shard, Record or None) per sample; None when `want(index)` is false:
    such a sample is stepped over without reading its data (how resume skips cheaply)."""
    stream, seekable = _open_shard(url)
    tar = TarStream(stream, url, seekable)
    index, key, files, keep = -1, None, {}, False  # type: int, Optional[str], Dict[str, bytes], bool
    try:
        while True:
            try:
                member = tar.next_member()
            except (OSError, ValueError) as e:  # I/O errors, unparsable numeric fields
                raise tar._error("%s: %s" % (type(e).__name__, e)) from None
            if member is None:
                break
            name, is_file = member
            if not is_file:
                continue
            m = _KEY_RE.match(name)
            if m is None or os.path.basename(name).startswith("."):
                continue
            if m.group(1) != key:
                if key is not None:
                    yield index, (Record(key, url, files) if keep else None)
                index, key, files = index + 1, m.group(1), {}
                keep = want is None or want(index)
            ext = m.group(2).lower()
            if keep and ext in _WANTED_EXTS:
                try:
                    files[ext] = tar.read_data()
                except OSError as e:
                    raise tar._error("%s: %s" % (type(e).__name__, e)) from None
        if key is not None:
            yield index, (Record(key, url, files) if keep else None)
    finally:
        stream.close()


def count_samples(url: str) -> int:
    """Samples in a shard by reading its tar headers (no image data is decoded)."""
    n = 0
    for _ in iter_records(url, want=lambda i: False):
        n += 1
    return n


# ----------------------------------------------------------------------------- shuffling

class ShuffleBuffer:
    """Seeded sample shuffle over a bounded buffer; the draws depend only on counts, so the
    same class run on integers replays a stream's shuffle without reading it (resume)."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.items = max(1, size), rng, []  # type: int, random.Random, List[Any]

    def offer(self, item: Any) -> Tuple[bool, Any]:
        """Add an item; once the buffer is full, draw one out: (True, item) else (False, None)."""
        self.items.append(item)
        return (True, self._draw()) if len(self.items) >= self.size else (False, None)

    def drain(self) -> Tuple[bool, Any]:
        return (True, self._draw()) if self.items else (False, None)

    def _draw(self) -> Any:
        i = self.rng.randrange(len(self.items))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return self.items.pop()


def replay_shuffle(size: int, rng: random.Random, total: Optional[int], outputs: int) -> Tuple[List[int], int]:
    """Run the shuffle on input indices until `outputs` items came out.

    Returns (buffer contents as input indices, index of the next unread input); `rng` is left
    exactly where the real shuffle would leave it. `total` None: an endless input.
    """
    buf = ShuffleBuffer(size, rng)
    nxt = out = 0
    while out < outputs:
        if total is None or nxt < total:
            got, _ = buf.offer(nxt)
            nxt += 1
        else:
            got, _ = buf.drain()
            if not got:
                break
        out += int(got)
    return buf.items, nxt


# ----------------------------------------------------------------------------- the epoch plan

def shard_order(num_shards: int, seed: int, epoch: int) -> List[int]:
    """The epoch's shard permutation: the same on every rank and worker."""
    order = list(range(num_shards))
    random.Random("shards/%d/%d" % (seed, epoch)).shuffle(order)
    return order


def plan_streams(counts: Sequence[int], num_streams: int, seed: int, epoch: int) -> List[List[int]]:
    """Shard indices per stream (data.streams) for one epoch, balanced by sample count.

    Shards go, largest first (ties in the epoch's random order), to the stream with the
    fewest samples so far (ties to the lowest stream). The streams' totals then depend only
    on the multiset of shard sizes, not on the epoch, so batches per epoch are a constant.
    Each stream reads its shards in the epoch's random order.
    """
    order = shard_order(len(counts), seed, epoch)
    position = {s: p for p, s in enumerate(order)}
    heap = [(0, r) for r in range(num_streams)]
    streams = [[] for _ in range(num_streams)]  # type: List[List[int]]
    for s in sorted(order, key=lambda s: (-counts[s], position[s])):
        total, r = heapq.heappop(heap)
        streams[r].append(s)
        heapq.heappush(heap, (total + counts[s], r))
    return [sorted(st, key=lambda s: position[s]) for st in streams]


def samples_per_stream(counts: Sequence[int], num_streams: int) -> List[int]:
    """Per-stream sample totals of `plan_streams`, sorted (the same for every epoch)."""
    return sorted(sum(counts[s] for s in st) for st in plan_streams(counts, num_streams, 0, 0))


def resampled_shards(num_shards: int, seed: int, epoch: int, stream: int) -> Iterator[int]:
    """Endless shard indices drawn with replacement for one stream (data.resampled=true)."""
    rng = random.Random("resample/%d/%d/%d" % (seed, epoch, stream))
    while True:
        yield rng.randrange(num_shards)


def stream_records(shards: ShardList, shard_ids: Any, buffer: int, rng: random.Random, start: int,
                   total: Optional[int], ring: int = 0) -> Iterator[Tuple[int, Record]]:
    """(output position, Record) of one shuffled stream, from output position `start`.

    The first `start` outputs are replayed on indices (no data read for samples already
    consumed, and shards wholly behind the resume point are not opened). With a finite
    input (`total` samples), once the input runs out the stream goes on forever by cycling
    over its last `ring` input samples: callers that must fill a fixed number of batches
    after dropping bad samples top up from there.
    """
    pending_list, next_unread = replay_shuffle(buffer, rng, total, start)
    pending = {idx: pos for pos, idx in enumerate(pending_list)}
    buf = ShuffleBuffer(buffer, rng)
    buf.items = list(pending_list)  # placeholders, replaced by the records as they are read
    keep_from = total - ring if total is not None else None
    tail = []  # type: List[Record]
    out, offset = start, 0

    def needed(i: int) -> bool:
        return i >= next_unread or i in pending or (keep_from is not None and i >= keep_from)

    for sid in shard_ids:
        url, count = shards.urls[sid], shards.counts[sid]
        if next_unread >= offset + count and not any(offset <= i < offset + count for i in pending) and \
                (keep_from is None or keep_from >= offset + count):
            offset += count  # entirely behind the resume point
            continue
        seen = 0
        for local, rec in iter_records(url, want=lambda j, o=offset: needed(o + j)):
            seen += 1
            idx = offset + local
            if rec is None:
                continue
            if keep_from is not None and idx >= keep_from:
                tail.append(rec)
            if idx < next_unread:
                if idx in pending:
                    buf.items[pending[idx]] = rec
                continue
            got, item = buf.offer(rec)
            if got:
                yield out, item
                out += 1
        if seen != count:
            raise DataError("shard %s holds %d samples but %s says %d: the shard changed since the manifest "
                            "was written; re-run make-shards (or remove the stale manifest)"
                            % (url, seen, shards.source, count))
        offset += count
    while True:
        got, item = buf.drain()
        if not got:
            break
        yield out, item
        out += 1
    if not tail:
        return
    while True:  # top-up: the same records again (the caller draws new crops for them)
        assert total is not None
        yield out, tail[(out - total) % len(tail)]
        out += 1
