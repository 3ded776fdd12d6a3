"""Decode only the crop: libjpeg-turbo's partial decoding (`jpeg_region.c`) through ctypes.

A RandomResizedCrop box of a 500x375 photo at 224 px never allows a reduced-size (DCT-scaled)
decode, and a full decode is most of the training path's time. libjpeg-turbo can skip the rows
above the box without the inverse DCT, upsampling and colour conversion, limit those stages to
the iMCU columns that hold the box, and stop after the box's last row. Neither torchvision nor
PIL reaches that API, so `jpeg_region.c` does, built here with the system's C compiler against
the system's libjpeg-turbo (`libjpeg-turbo-dev` / `libjpeg62-turbo-dev`) once per machine, into
`$VIT_ACCEL_CACHE` (default `~/.cache/vit-accel`; a library or folder that another user owns or
may write is never loaded).

The box's pixels are the full decode's pixels, with a margin of `MARGIN` decoded pixels around
the box so that the region's own edges (where chroma upsampling has no neighbour) never reach
it; tests compare against torchvision's full decode over subsamplings, progressive files,
restart intervals and boxes touching every edge. Where it cannot build (no compiler, no
header) or refuses a file (corrupt data, truncation, CMYK), the caller decodes the exact way
with the same box.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("jpeg_region.c")
MARGIN = 2  # decoded pixels kept around the box (chroma upsampling reads one neighbour each side)
_EOI = b"\xff\xd9"  # a JPEG's last two bytes
_MAX_IMCU = 32  # widest iMCU (4:1:1 subsampling): what jpeg_crop_scanline may widen each side by
_state = {}  # type: dict


def cache_dir() -> Path:
    return Path(os.environ.get("VIT_ACCEL_CACHE") or Path.home() / ".cache" / "vit-accel")


# every symbol resolved at link time: a libjpeg without libjpeg-turbo's partial decoding fails the
# build (and says so), not a worker's first call
_FLAGS = ["-O2", "-shared", "-fPIC"] + (["-Wl,--no-undefined"] if sys.platform.startswith("linux") else [])


def _library_path() -> Path:
    """The built library's path: a new source or new flags build a new file."""
    key = SOURCE.read_bytes() + " ".join(_FLAGS + [platform.machine()]).encode()
    tag = hashlib.sha256(key).hexdigest()[:16]
    return cache_dir() / ("jpeg_region-%s.so" % tag)


def _private(path: Path) -> str:
    """'' when `path` is ours and nobody else may write it, else why it must not be loaded: a
    shared library in a folder others can write is code anyone of them can run in our process."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return "%s belongs to another user" % path
    if st.st_mode & 0o022:
        return "%s is writable by others (chmod go-w it, or set VIT_ACCEL_CACHE to a private folder)" % path
    return ""


def build(path: Path) -> str:
    """Compile `jpeg_region.c` into `path` (atomically); '' on success, else why not."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler (cc) on PATH"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    why = _private(path.parent)
    if why:
        return why
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(SOURCE), "-ljpeg"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if proc.returncode != 0:  # the compiler's first error says most (a missing jpeglib.h, a symbol)
            lines = proc.stdout.strip().splitlines()
            first = next((x for x in lines if "error" in x.lower() or "undefined" in x.lower()), None)
            return "%s failed: %s" % (cc, first or (lines[-1] if lines else "exit %d" % proc.returncode))
        os.replace(tmp, str(path))
        return ""
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> Optional[ctypes.CDLL]:
    """The built decoder, building it on first use; None (and `unavailable()` says why) where it
    cannot be built or loaded here."""
    if "lib" in _state:
        return _state["lib"]
    _state["lib"], _state["why"] = None, ""
    if sys.platform == "win32":
        _state["why"] = "the partial JPEG decoder is built for Linux and macOS only"
        return None
    path = None
    try:
        path = _library_path()
        why = (_private(path.parent) or _private(path)) if path.exists() else build(path)
        if why:
            _state["why"] = why
            return None
        lib = ctypes.CDLL(str(path))
        fn = lib.vit_accel_jpeg_region
    except (OSError, AttributeError, RuntimeError) as e:  # RuntimeError: no home folder to cache in
        _state["why"] = "cannot build or load %s: %s" % (path or "the partial JPEG decoder", e)
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                   ctypes.POINTER(ctypes.c_int),
                   ctypes.c_char_p, ctypes.c_int]
    _state["lib"] = lib
    return lib


def unavailable() -> str:
    """'' when the partial decoder works here, else the reason."""
    library()
    return _state["why"]


def _decode(data: bytes, size: Tuple[int, int], box: Tuple[int, int, int, int], canvas: bool,
            message: Optional[ctypes.Array] = None) -> Optional[Tuple[torch.Tensor, int, int, int]]:
    """(buffer, first decoded column, decoded width, first row) for `box` widened by MARGIN, or None
    (libjpeg's reason in `message` when one is given)."""
    lib = library()
    if lib is None or data[-2:] != _EOI:
        return None
    left, top, w, h = box
    x0, y0 = max(0, left - MARGIN), max(0, top - MARGIN)
    x1, y1 = min(size[0], left + w + MARGIN), min(size[1], top + h + MARGIN)
    if canvas:
        out = torch.empty((size[1], size[0], 3), dtype=torch.uint8)
    else:
        out = torch.empty((y1 - y0, min(size[0], x1 - x0 + 2 * _MAX_IMCU), 3), dtype=torch.uint8)
    got_left, got_width = ctypes.c_int(), ctypes.c_int()
    status = lib.vit_accel_jpeg_region(data, len(data), x0, y0, x1 - x0, y1 - y0, out.data_ptr(), out.numel(),
                                       int(canvas), ctypes.byref(got_left), ctypes.byref(got_width), message,
                                       len(message) if message is not None else 0)
    return None if status != 0 else (out, got_left.value, got_width.value, y0)


def decode_box(data: bytes, size: Tuple[int, int], box: Tuple[int, int, int, int]
               ) -> Optional[Tuple[torch.Tensor, Tuple[int, int, int, int]]]:
    """(uint8 [3, h', w'] HWC-memory window, the box within it), or None when libjpeg refuses the
    file (the caller decodes it the exact way). `size` is the image's (width, height), `box`
    (left, top, w, h) in its pixels. A file that does not end in an EOI marker is refused here:
    decoding stops after the box, so a truncated file would otherwise pass."""
    got = _decode(data, size, box, canvas=False)
    if got is None:
        return None
    out, got_left, width, y0 = got
    rows = out.shape[0]
    window = out.view(-1)[:rows * width * 3].view(rows, width, 3).permute(2, 0, 1)
    return window, (box[0] - got_left, box[1] - y0, box[2], box[3])


def decode_into_canvas(data: bytes, size: Tuple[int, int], box: Tuple[int, int, int, int]) -> Optional[torch.Tensor]:
    """uint8 [3, H, W] (HWC memory) of the whole image's size in which only `box` (and a margin)
    holds decoded pixels, the rest whatever memory held: for an operation on the whole image
    whose wanted outputs read only `box` (evaluation's resize, then center crop). None: refused."""
    got = _decode(data, size, box, canvas=True)
    return None if got is None else got[0].permute(2, 0, 1)


def why_refused(data: bytes, size: Tuple[int, int], box: Tuple[int, int, int, int]) -> str:
    """libjpeg's message for a file `decode_box` refuses ('' when it decodes): for tests and errors."""
    if library() is None:
        return unavailable()
    if data[-2:] != _EOI:
        return "no end-of-image marker: possibly truncated, never decoded partially"
    msg = ctypes.create_string_buffer(256)
    if _decode(data, size, box, False, msg) is not None:
        return ""
    return msg.value.decode("utf-8", "replace") or "the box is outside the image"
