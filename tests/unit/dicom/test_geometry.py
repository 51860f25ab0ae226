import numpy as np

from medimg.dicom.geometry import direction_cosines, lps_affine, ras_affine


def test_axial_normal_points_superior() -> None:
    _, _, normal = direction_cosines([1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose(normal, [0, 0, 1])


def test_sagittal_normal_points_right() -> None:
    # LPS: the normal of a standard sagittal plane is -x, towards the patient's right
    _, _, normal = direction_cosines([0, 1, 0, 0, 0, -1])
    np.testing.assert_allclose(normal, [-1, 0, 0])


def test_affine_maps_voxels_to_positions() -> None:
    aff = lps_affine([1, 0, 0, 0, 1, 0], [0.5, 0.7], [10, 20, 30], [0, 0, 2.5])
    # column index i moves along the row direction by the column spacing (PixelSpacing[1])
    np.testing.assert_allclose(aff @ [2, 3, 4, 1], [10 + 2 * 0.7, 20 + 3 * 0.5, 30 + 10, 1])
    np.testing.assert_allclose(ras_affine(aff) @ [0, 0, 0, 1], [-10, -20, 30, 1])
