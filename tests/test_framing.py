"""Tests of the canonical face framing."""

from __future__ import annotations

import numpy as np

from cabin_monitor.vision.framing import (
    FLIP_68,
    TEMPLATE_5,
    apply_affine,
    cv2_matrix,
    five_points_from_68,
    inter_ocular,
    invert_affine,
    limit_detail,
    similarity_transform,
)


def test_similarity_recovers_a_known_transform() -> None:
    """A rotation, scale and shift applied to points is recovered exactly."""
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    dst = src @ rot.T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], rot, atol=1e-5)
    assert np.allclose(m[:, 2], shift, atol=1e-5)


def test_inverse_round_trips_points() -> None:
    """Mapping points forward and back returns them."""
    m = similarity_transform(TEMPLATE_5, TEMPLATE_5 * 100 + 7)
    pts = np.array([[3.0, 4.0], [50.0, 60.0]], np.float32)
    assert np.allclose(apply_affine(invert_affine(m), apply_affine(m, pts)), pts, atol=1e-4)


def test_flip_permutation_is_an_involution_that_swaps_eye_corners() -> None:
    """Mirroring twice is the identity and the outer eye corners trade places."""
    assert sorted(FLIP_68.tolist()) == list(range(68))
    assert np.array_equal(FLIP_68[FLIP_68], np.arange(68))
    assert FLIP_68[36] == 45 and FLIP_68[48] == 54 and FLIP_68[30] == 30


def test_template_is_left_right_symmetric() -> None:
    """Mirroring the template about the crop centre gives the template back (with left/right swapped)."""
    mirrored = np.stack([1.0 - TEMPLATE_5[:, 0], TEMPLATE_5[:, 1]], 1)[[1, 0, 2, 4, 3]]
    assert np.allclose(mirrored, TEMPLATE_5)


def test_five_points_and_inter_ocular_of_a_shape() -> None:
    """Eye centres average their six points; inter-ocular distance spans points 36 and 45."""
    shape = np.zeros((68, 2), np.float32)
    shape[36:42] = [10, 20]
    shape[42:48] = [30, 20]
    shape[45] = [34, 20]
    shape[36] = [6, 20]
    five = five_points_from_68(shape)
    assert np.allclose(five[0], [(6 + 5 * 10) / 6, 20])
    assert inter_ocular(shape) == np.float32(28.0)


def test_cv2_matrix_shifts_by_half_a_pixel() -> None:
    """Identity stays identity; a 2x zoom gains the half-pixel correction."""
    assert np.allclose(cv2_matrix(np.array([[1, 0, 0], [0, 1, 0]], np.float32)), [[1, 0, 0], [0, 1, 0]])
    assert np.allclose(cv2_matrix(np.array([[2, 0, 0], [0, 2, 0]], np.float32))[:, 2], [0.5, 0.5])


def test_limit_detail_keeps_coarse_content_and_removes_fine_detail() -> None:
    """A crop brought to 48 px of detail keeps its size and flat areas, loses a one-pixel checkerboard."""
    crops = np.zeros((2, 64, 64), np.uint8)
    crops[0] = 120
    crops[1] = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    out = limit_detail(crops, 48)
    assert out.shape == crops.shape and out.dtype == np.uint8
    assert (out[0] == 120).all()
    assert out[1].std() < 0.5 * crops[1].std()


def test_limit_detail_leaves_crops_at_or_below_the_level_alone() -> None:
    """Asking for as much detail as the crop has, or more, returns the crop unchanged."""
    crops = np.random.default_rng(0).integers(0, 256, (1, 48, 48), dtype=np.uint8)
    assert limit_detail(crops, 48) is crops and limit_detail(crops, 64) is crops
