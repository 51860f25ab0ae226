"""From a checked stack to a volume on a RAS grid, and masks onto that grid.

Volumes are arrays indexed (i, j, k) = (column, row, slice), slices ascending along the
slice normal, with a RAS affine: the convention of dcm2niix and nibabel. Writing goes
through a temporary file and a rename.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage
from zlib_ng import gzip_ng

from medimg.dicom.geometry import direction_cosines, lps_affine, ras_affine
from medimg.dicom.series import GANTRY_TILT, Stack
from medimg.io import atomic_path

FloatArray = npt.NDArray[np.float64]


def stack_volume(
    stack: Stack, pixels: npt.NDArray, resample: bool
) -> tuple[npt.NDArray, FloatArray]:
    """Volume (i, j, k) and its RAS affine.

    Args:
        stack: a sorted, checked stack.
        pixels: real values shaped (slices, rows, columns) in stack order.

    Returns:
        A view of ``pixels`` (or, resampled, a float32 array) indexed (i, j, k), and the
        RAS affine.
        resample: put irregular stacks (missing slices, uneven gaps, gantry tilt) onto a
            uniform orthogonal grid by linear interpolation, as dcm2niix does.
    """
    if resample and stack.irregular:
        pixels, lps = _uniform(stack, pixels)
    else:
        lps = stack.lps_affine()
    return pixels.transpose(2, 1, 0), ras_affine(lps)


def _uniform(stack: Stack, pixels: npt.NDArray) -> tuple[npt.NDArray[np.float32], FloatArray]:
    """The stack on a uniform orthogonal grid, float32, computed a slice at a time in
    float64: memory is the float32 result, not float64 copies of the whole series."""
    row, col, normal = direction_cosines(stack.orientation)
    p = stack.positions
    along = (p - p[0]) @ normal
    gaps = np.diff(along)
    spacing = float(np.median(gaps[gaps > 1e-3]))
    tilted = GANTRY_TILT in stack.flags
    dr, dc = stack.pixel_spacing

    @functools.lru_cache(maxsize=2)  # consecutive target slices share a source slice
    def source(k: int) -> FloatArray:
        plane = pixels[k].astype(np.float64)
        if tilted:  # shift each slice back under the first one
            shear = p[k] - p[0] - along[k] * normal
            shift = (-float(shear @ col) / dr, -float(shear @ row) / dc)
            plane = ndimage.shift(plane, shift, order=1, mode="nearest")
        return plane

    kept = np.flatnonzero(np.concatenate([[True], gaps > 1e-3]))  # one slice per position
    along = along[kept]
    n = round(along[-1] / spacing) + 1
    target = np.arange(n) * spacing
    hi = np.clip(np.searchsorted(along, target, side="right"), 1, len(along) - 1)
    lo = hi - 1
    w = np.clip((target - along[lo]) / (along[hi] - along[lo]), 0.0, 1.0)
    out = np.empty((n, *pixels.shape[1:]), dtype=np.float32)
    for t in range(n):
        out[t] = source(kept[lo[t]]) * (1 - w[t]) + source(kept[hi[t]]) * w[t]
    return out, lps_affine(stack.orientation, stack.pixel_spacing, p[0], normal * spacing)


def _nifti_order_bytes(volume: npt.NDArray) -> memoryview:
    """The voxels as NIfTI stores them (i fastest), without a copy when possible."""
    return np.ascontiguousarray(np.asfortranarray(volume).T).data.cast("B")


def content_hash(volume: npt.NDArray, affine: FloatArray) -> str:
    """SHA-256 of voxel values (in NIfTI order), dtype, shape and affine rounded to 1e-4 mm."""
    h = hashlib.sha256()
    h.update(str(volume.dtype).encode())
    h.update(np.asarray(volume.shape, dtype=np.int64).tobytes())
    h.update(_nifti_order_bytes(volume))
    h.update(np.round(affine, 4).astype(np.float64).tobytes())
    return h.hexdigest()


GZIP_CHUNK = 8 << 20  # bytes of voxels per gzip member when compressing in parallel


def save_nifti(
    volume: npt.NDArray, affine: FloatArray, path: Path, level: int = 1, threads: int = 1
) -> None:
    """Write NIfTI-1 atomically, qform and sform both set (scanner code).

    ``.nii.gz`` paths are gzip-compressed at ``level`` with a zero timestamp, so equal
    content gives equal bytes. The voxels are compressed in chunks, each a gzip member of
    its own (valid gzip, as pigz writes it), ``threads`` of them side by side.
    """
    img = nib.Nifti1Image(volume, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"medimg"
    img.header.set_data_offset(352)
    head = img.header.binaryblock + b"\0" * 4  # 348-byte header, empty extension flag
    data = _nifti_order_bytes(np.asarray(volume, dtype=img.header.get_data_dtype()))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if not str(path).endswith(".gz"):
            f.write(head)
            f.write(data)
            return
        chunks = [head] + [data[i : i + GZIP_CHUNK] for i in range(0, len(data), GZIP_CHUNK)]

        def pack(chunk: bytes | memoryview) -> bytes:
            # zlib-ng: same gzip format, about 5x faster than zlib at level 6
            return bytes(gzip_ng.compress(chunk, compresslevel=level, mtime=0))

        # The members are the same however many threads compress them: equal bytes.
        if threads > 1 and len(chunks) > 2:
            from collections import deque
            from concurrent.futures import ThreadPoolExecutor

            # at most 2 x threads members in flight: memory is bounded by the chunk size,
            # not by the series (pool.map would hold every compressed member at once)
            with ThreadPoolExecutor(threads) as pool:  # zlib releases the GIL
                pending: deque = deque()
                for chunk in chunks:
                    if len(pending) >= 2 * threads:
                        f.write(pending.popleft().result())
                    pending.append(pool.submit(pack, chunk))
                while pending:
                    f.write(pending.popleft().result())
        else:
            for chunk in chunks:
                f.write(pack(chunk))


MASK_SLAB_VOXELS = 1 << 22  # volume voxels resampled at once by align_mask (~100 MB of index)


def align_mask(
    mask: nib.Nifti1Image, shape: tuple[int, ...], affine: FloatArray
) -> npt.NDArray[np.uint8] | None:
    """The mask on the volume's grid, or None when the two grids do not overlap.

    Grids that differ only by axis order, flips and a whole-voxel shift (a mask saved in
    file order, the volume sorted along the normal) are matched exactly, by slicing: no
    memory beyond the mask and the result. Anything else is resampled with nearest
    neighbour a slab of slices at a time, so a large series needs a bounded few bytes of
    index per voxel of one slab, not of the volume.
    """
    data = np.asarray(mask.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return None
    vox = np.linalg.inv(mask.affine) @ affine  # volume voxel -> mask voxel
    lin, off = vox[:3, :3], vox[:3, 3]
    rounded = np.round(lin)
    exact = np.allclose(lin, rounded, atol=1e-3) and np.allclose(off, np.round(off), atol=1e-2)
    if exact and all(np.sum(np.abs(rounded), axis=0) == 1):
        return _permuted_mask(data, shape, rounded, np.round(off).astype(np.int64))
    out = np.zeros(shape, dtype=np.uint8)
    inside = 0
    limit = np.asarray(data.shape)[:, None]
    plane = int(shape[0] * shape[1])
    slab = max(1, MASK_SLAB_VOXELS // max(plane, 1))
    ij = np.indices(shape[:2]).reshape(2, -1).astype(np.float64)
    for k0 in range(0, shape[2], slab):
        ks = np.arange(k0, min(k0 + slab, shape[2]), dtype=np.float64)
        idx = np.vstack([np.tile(ij, len(ks)), np.repeat(ks, plane)[None]])
        src = np.round(lin @ idx + off[:, None]).astype(np.int64)
        ok = np.all((src >= 0) & (src < limit), axis=0)
        inside += int(ok.sum())
        flat = np.zeros(idx.shape[1], dtype=np.uint8)
        flat[ok] = data[tuple(src[:, ok])] > 0
        out[:, :, k0 : k0 + len(ks)] = flat.reshape(len(ks), shape[0], shape[1]).transpose(1, 2, 0)
    if inside < 0.5 * out.size:
        return None
    return out


def _permuted_mask(
    data: npt.NDArray, shape: tuple[int, ...], perm: FloatArray, off: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint8] | None:
    """``data`` read at ``perm @ (i, j, k) + off`` for every volume voxel, where ``perm``
    is a signed permutation: an axis order, flips and a shift of the mask's array."""
    axes = [int(np.flatnonzero(perm[:, a])[0]) for a in range(3)]  # mask axis of volume axis
    signs = [int(perm[axes[a], a]) for a in range(3)]
    view = data.transpose(axes)  # view[x0, x1, x2]: mask axis axes[a] indexed by x_a
    dst: list[slice] = []
    src: list[slice] = []
    for a in range(3):
        n, m, o, s = shape[a], view.shape[a], int(off[axes[a]]), signs[a]
        # volume index t reads mask index o + s * t; keep the t with 0 <= o + s * t < m
        lo, hi = (max(0, -o), min(n, m - o)) if s > 0 else (max(0, o - m + 1), min(n, o + 1))
        if hi <= lo:
            return None
        dst.append(slice(lo, hi))
        first, last = o + s * lo, o + s * (hi - 1)
        src.append(
            slice(first, last + 1) if s > 0 else slice(first, last - 1 if last else None, -1)
        )
    inside = np.prod([d.stop - d.start for d in dst])
    if inside < 0.5 * np.prod(shape):
        return None
    out = np.zeros(shape, dtype=np.uint8)
    np.greater(view[tuple(src)], 0, out=out[tuple(dst)], casting="unsafe")
    return out
