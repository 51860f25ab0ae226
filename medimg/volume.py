"""From a checked stack to a volume on a RAS grid, and masks onto that grid.

Volumes are arrays indexed (i, j, k) = (column, row, slice), slices ascending along the
slice normal, with a RAS affine: the convention of dcm2niix and nibabel. Writing goes
through a temporary file and a rename.
"""

from __future__ import annotations

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
        uniform, lps = _uniform(stack, pixels.astype(np.float64))
        pixels = uniform.astype(np.float32)
    else:
        lps = stack.lps_affine()
    return pixels.transpose(2, 1, 0), ras_affine(lps)


def _uniform(stack: Stack, pixels: FloatArray) -> tuple[FloatArray, FloatArray]:
    row, col, normal = direction_cosines(stack.orientation)
    p = stack.positions
    along = (p - p[0]) @ normal
    gaps = np.diff(along)
    spacing = float(np.median(gaps[gaps > 1e-3]))
    if GANTRY_TILT in stack.flags:  # shift each slice back under the first one
        dr, dc = stack.pixel_spacing
        pixels = pixels.copy()
        for k in range(len(p)):
            shear = p[k] - p[0] - along[k] * normal
            shift = (-float(shear @ col) / dr, -float(shear @ row) / dc)
            pixels[k] = ndimage.shift(pixels[k], shift, order=1, mode="nearest")
    keep = np.concatenate([[True], gaps > 1e-3])  # one slice per position
    along, pixels = along[keep], pixels[keep]
    n = round(along[-1] / spacing) + 1
    target = np.arange(n) * spacing
    hi = np.clip(np.searchsorted(along, target, side="right"), 1, len(along) - 1)
    lo = hi - 1
    w = np.clip((target - along[lo]) / (along[hi] - along[lo]), 0.0, 1.0)[:, None, None]
    out = pixels[lo] * (1 - w) + pixels[hi] * w
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
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:  # zlib releases the GIL
                for member in pool.map(pack, chunks):
                    f.write(member)
        else:
            for chunk in chunks:
                f.write(pack(chunk))


def align_mask(
    mask: nib.Nifti1Image, shape: tuple[int, ...], affine: FloatArray
) -> npt.NDArray[np.uint8] | None:
    """The mask on the volume's grid, or None when the two grids do not overlap.

    Grids that differ only by axis order and flips (a mask saved in file order, the volume
    sorted along the normal) are matched exactly; anything else is resampled with nearest
    neighbour.
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
        idx = np.indices(shape).reshape(3, -1)
        src = (rounded @ idx + np.round(off)[:, None]).astype(np.int64)
    else:
        idx = np.indices(shape).reshape(3, -1).astype(np.float64)
        src = np.round(lin @ idx + off[:, None]).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.asarray(data.shape)[:, None]), axis=0)
    if inside.mean() < 0.5:
        return None
    out = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    out[inside] = (data[tuple(src[:, inside])] > 0).astype(np.uint8)
    return out.reshape(shape)
