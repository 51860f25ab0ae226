"""Pure geometry of DICOM image planes: direction cosines, slice normals, affines.

DICOM patient coordinates are LPS (x to the patient's left, y posterior, z superior);
NIfTI world coordinates are RAS. Voxel index order throughout medimg is (i, j, k) =
(column, row, slice), as in dcm2niix and nibabel's DICOM support.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def direction_cosines(iop: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Split ImageOrientationPatient into (row, column, normal) unit vectors.

    ``row`` is the direction of increasing column index, ``column`` the direction of
    increasing row index, ``normal = row x column``.
    """
    v = np.asarray(iop, dtype=np.float64).reshape(2, 3)
    row, col = v[0] / np.linalg.norm(v[0]), v[1] / np.linalg.norm(v[1])
    return row, col, np.cross(row, col)


def lps_affine(
    iop: npt.ArrayLike,
    pixel_spacing: Sequence[float],
    first_position: npt.ArrayLike,
    slice_step: npt.ArrayLike,
) -> FloatArray:
    """Affine from voxel (i, j, k) to LPS millimetres.

    Args:
        iop: ImageOrientationPatient (six direction cosines).
        pixel_spacing: PixelSpacing, i.e. [row spacing, column spacing] in mm.
        first_position: ImagePositionPatient of slice k = 0, mm.
        slice_step: vector from slice k to slice k + 1, mm.
    """
    row, col, _ = direction_cosines(iop)
    affine = np.eye(4)
    affine[:3, 0] = row * float(pixel_spacing[1])
    affine[:3, 1] = col * float(pixel_spacing[0])
    affine[:3, 2] = np.asarray(slice_step, dtype=np.float64)
    affine[:3, 3] = np.asarray(first_position, dtype=np.float64)
    return affine


def ras_affine(lps: FloatArray) -> FloatArray:
    """Convert an LPS affine to the RAS convention of NIfTI."""
    return LPS_TO_RAS @ lps
