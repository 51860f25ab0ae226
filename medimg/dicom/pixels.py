"""Pixel data of a stack as real values (CT in Hounsfield units), slice by slice.

Native (uncompressed) little-endian single-frame files take a fast path that reads the
trailing Pixel Data element straight into numpy; everything else goes through pydicom's
pixel handlers (pylibjpeg decoders for JPEG, JPEG-LS, JPEG 2000 and RLE). Rescale
slope and intercept are applied per slice, since some vendors vary them along a series.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.uid import UID

from medimg.dicom.discover import Instance
from medimg.dicom.read import dcmread
from medimg.dicom.series import Slice, Stack
from medimg.errors import DicomError

log = logging.getLogger(__name__)

NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit and explicit VR LE
PIXEL_TAG = b"\xe0\x7f\x10\x00"


class PixelDecodeError(DicomError):
    """Pixel data that cannot be decoded; ``reason`` is a quarantine code."""

    def __init__(self, path: Path, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.path = path
        self.reason = reason
        self.detail = detail


def _dtype(inst: Instance) -> np.dtype:
    kind = "i" if inst.pixel_representation == 1 else "u"
    if inst.bits_allocated not in (8, 16, 32):
        raise PixelDecodeError(
            inst.path, "unsupported_pixels", f"BitsAllocated {inst.bits_allocated}"
        )
    return np.dtype(f"<{kind}{inst.bits_allocated // 8}")


def _fix_bits(arr: npt.NDArray, inst: Instance) -> npt.NDArray:
    """Mask unused high bits and sign-extend, as pydicom does for BitsStored < BitsAllocated."""
    bs, ba = inst.bits_stored, inst.bits_allocated
    if bs >= ba:
        return arr
    if inst.pixel_representation == 1:
        shift = ba - bs
        return (arr << shift) >> shift
    arr &= (1 << bs) - 1  # in place: the array is ours
    return arr


def _fast_native(inst: Instance, scratch: npt.NDArray | None = None) -> npt.NDArray | None:
    """Pixels of a native LE single-frame file read from its tail, or None if not possible.

    With ``scratch`` (a buffer of the right dtype and size, reused slice after slice) the
    pixels land there, sparing a fresh allocation and its page faults per slice.
    """
    if inst.transfer_syntax not in NATIVE_LE or inst.multiframe:
        return None
    dtype = _dtype(inst)
    count = inst.rows * inst.columns
    n = count * dtype.itemsize
    n_even = n + (n % 2)
    with open(inst.path, "rb") as f:
        size = f.seek(0, 2)
        if size < n_even + 12:
            return None
        f.seek(size - n_even - 12)
        head = f.read(12)
        explicit = head[:4] == PIXEL_TAG and head[4:6] in (b"OW", b"OB") and head[6:8] == b"\0\0"
        implicit = head[4:8] == PIXEL_TAG  # tag, then a 4-byte length
        if not ((explicit or implicit) and struct.unpack("<I", head[8:12])[0] == n_even):
            return None  # trailing elements after Pixel Data, or an odd layout: use pydicom
        if size - n_even - (12 if explicit else 8) != inst.header_end:
            return None  # the header scan did not end at this tag (a damaged length): pydicom
        if scratch is not None and scratch.dtype == dtype and scratch.size == count:
            arr = scratch
            if f.readinto(arr.data.cast("B")) != n:
                return None
        else:
            arr = np.fromfile(f, dtype=dtype, count=count)  # straight into the array
            if arr.size != count:
                return None
    return _fix_bits(arr.reshape(inst.rows, inst.columns), inst)


def _pydicom_frames(inst: Instance) -> npt.NDArray:
    """All frames of a file through pydicom, shaped (frames, rows, columns)."""
    try:
        ds = dcmread(inst.path)
        arr = ds.pixel_array
    except BaseException as e:
        # A Rust decoder's panic on damaged data (pyo3's PanicException) is no Exception.
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        ts = UID(inst.transfer_syntax).name if inst.transfer_syntax else "unknown"
        reason = "unreadable" if isinstance(e, (EOFError, OSError)) else "pixel_decode"
        raise PixelDecodeError(
            inst.path, reason, f"pixel data cannot be decoded ({ts}; {type(e).__name__})"
        ) from e
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    declared = len(inst.frames) if inst.multiframe else 1
    if arr.shape[1:] != (inst.rows, inst.columns) or len(arr) != declared:
        # pydicom may cut pixel data too long for a damaged Rows into extra frames
        raise PixelDecodeError(
            inst.path, "pixel_decode", f"pixel array shape {arr.shape}, {declared} frame(s)"
        )
    return arr


def _output_dtype(stack: Stack) -> np.dtype:
    """The narrowest dtype that holds every real value exactly (float32 when scaled)."""
    lo_all, hi_all = np.inf, -np.inf
    for s in stack.slices:
        inst, f = s.instance, s.frame
        if not (float(f.slope).is_integer() and float(f.intercept).is_integer()):
            return np.dtype(np.float32)
        bits = inst.bits_stored
        lo, hi = (
            (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            if inst.pixel_representation
            else (
                0,
                (1 << bits) - 1,
            )
        )
        ends = (lo * f.slope + f.intercept, hi * f.slope + f.intercept)
        lo_all, hi_all = min(lo_all, *ends), max(hi_all, *ends)
    for dtype in (np.int16, np.int32):
        if np.iinfo(dtype).min <= lo_all and hi_all <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.float32)


def read_stack(stack: Stack, threads: int = 1) -> npt.NDArray:
    """Real-valued pixels of every slice, shaped (slices, rows, columns), in stack order.

    The dtype is int16 or int32 when every value is an integer that fits (CT in HU), else
    float32.

    Raises:
        PixelDecodeError: naming the file and the reason (transfer syntax, truncation).
    """
    first = stack.first
    dtype = _output_dtype(stack)
    out = np.empty((len(stack.slices), first.rows, first.columns), dtype=dtype)
    by_file: dict[Path, list[tuple[int, Slice]]] = defaultdict(list)
    for k, s in enumerate(stack.slices):
        by_file[s.path].append((k, s))

    local = threading.local()  # one scratch buffer per thread

    def fill(items: list[tuple[int, Slice]]) -> None:
        inst = items[0][1].instance
        if getattr(local, "buf", None) is None or local.buf.size != inst.rows * inst.columns:
            local.buf = np.empty(inst.rows * inst.columns, dtype=_dtype(inst))
        fast = _fast_native(inst, local.buf)
        frames = fast[None] if fast is not None else _pydicom_frames(inst)
        if len(frames) < max(s.frame.index for _, s in items) + 1:
            raise PixelDecodeError(
                inst.path, "pixel_decode", f"{len(frames)} frames where more were declared"
            )
        for k, s in items:
            values = frames[s.frame.index]
            if inst.photometric == "MONOCHROME1":  # minimum is white: invert to MONOCHROME2
                top = (1 << inst.bits_stored) - 1
                values = (top - values.astype(np.int64)) - (
                    (1 << inst.bits_stored) if inst.pixel_representation == 1 else 0
                )
            slope, intercept = s.frame.slope, s.frame.intercept
            if dtype.kind == "f":
                out[k] = values.astype(np.float64) * slope + intercept
            elif slope == 1:
                np.add(values, np.int32(intercept), out=out[k], casting="unsafe")
            else:
                out[k] = values.astype(np.int64) * int(slope) + int(intercept)

    groups = list(by_file.values())
    if threads > 1 and len(groups) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:  # file reads and numpy release the GIL
            list(pool.map(fill, groups))
    else:
        for items in groups:
            fill(items)
    return out
