"""Masks onto the volume grid: the sliced and slab-wise paths against a direct reference."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from medimg import volume
from medimg.volume import align_mask


def reference(mask: nib.Nifti1Image, shape: tuple[int, int, int], affine: np.ndarray):
    """Every volume voxel mapped through the affines at once (memory: ~50 bytes a voxel)."""
    data = np.asarray(mask.dataobj)
    vox = np.linalg.inv(mask.affine) @ affine
    idx = np.indices(shape).reshape(3, -1).astype(np.float64)
    src = np.round(vox[:3, :3] @ idx + vox[:3, 3:4]).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.asarray(data.shape)[:, None]), axis=0)
    if inside.mean() < 0.5:
        return None
    out = np.zeros(idx.shape[1], dtype=np.uint8)
    out[inside] = data[tuple(src[:, inside])] > 0
    return out.reshape(shape)


def signed_permutations():
    for axes in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            for a, (ax, s) in enumerate(zip(axes, signs, strict=True)):
                m[ax, a] = s
            yield m


@pytest.mark.parametrize("shift", [(0, 0, 0), (2, -1, 3), (-3, 0, 1)])
def test_axis_order_flips_and_shifts_match_the_reference(shift: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    shape = (7, 6, 5)
    data = ((rng.random((9, 8, 7)) > 0.6) * rng.integers(1, 4, (9, 8, 7))).astype(np.uint8)
    vol_affine = np.diag([0.8, 0.8, 2.5, 1.0])
    vol_affine[:3, 3] = (-10, 5, 30)
    checked = 0
    for perm in signed_permutations():
        lin = perm * 1.0
        # mask voxel = lin @ volume voxel + off, with off chosen so the grids mostly overlap
        off = np.array(shift, dtype=float)
        for a in range(3):
            ax = int(np.flatnonzero(perm[:, a])[0])
            if perm[ax, a] < 0:
                off[ax] += shape[a] - 1
        vox = np.eye(4)
        vox[:3, :3], vox[:3, 3] = lin, off
        mask_affine = vol_affine @ np.linalg.inv(vox)
        mask = nib.Nifti1Image(data, mask_affine)
        want = reference(mask, shape, vol_affine)
        got = align_mask(mask, shape, vol_affine)
        if want is None:
            assert got is None
        else:
            assert got is not None and got.dtype == np.uint8
            np.testing.assert_array_equal(got, want)
            checked += 1
    assert checked >= 24  # most of the 48 orientations overlap enough to give a mask


def test_grids_that_barely_overlap_give_none() -> None:
    data = np.ones((4, 4, 4), dtype=np.uint8)
    mask_affine = np.eye(4)
    mask_affine[:3, 3] = (3, 0, 0)  # volume voxels 3.. hold the mask: 1 of 4 columns
    assert align_mask(nib.Nifti1Image(data, mask_affine), (4, 4, 4), np.eye(4)) is None


@pytest.mark.parametrize("slab", [1, 37, 1 << 22])
def test_resampled_masks_match_the_reference_whatever_the_slab(
    slab: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(volume, "MASK_SLAB_VOXELS", slab)
    rng = np.random.default_rng(1)
    data = (rng.random((20, 18, 9)) > 0.5).astype(np.int16)
    mask_affine = np.diag([1.0, 1.0, 3.0, 1.0])
    c, s = np.cos(0.2), np.sin(0.2)  # a rotated, finer volume grid: not a permutation
    vol_affine = np.eye(4)
    vol_affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.7, 0.7, 2.0])
    vol_affine[:3, 3] = (1.5, 0.5, 0.5)
    want = reference(nib.Nifti1Image(data, mask_affine), (22, 20, 12), vol_affine)
    got = align_mask(nib.Nifti1Image(data, mask_affine), (22, 20, 12), vol_affine)
    assert want is not None and got is not None
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)


def test_threaded_compression_writes_the_same_bytes(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(volume, "GZIP_CHUNK", 1000)  # many members, more than in flight
    rng = np.random.default_rng(2)
    vol = rng.integers(-1000, 2000, (30, 20, 10)).astype(np.int16)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    paths = [tmp_path / f"v{threads}.nii.gz" for threads in (1, 2, 3)]
    for threads, path in zip((1, 2, 3), paths, strict=True):
        volume.save_nifti(vol, affine, path, threads=threads)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    img = nib.load(paths[2])
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    np.testing.assert_allclose(img.affine, affine)
