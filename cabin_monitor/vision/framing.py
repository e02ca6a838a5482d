"""The canonical face framing shared by training, alignment and the model.

A face crop is "canonical" when five reference points land on the template
below, in units of the crop side. The template is the mean position of the
YuNet keypoints measured on FER2013 training faces, made left/right
symmetric, so FER2013 crops are canonical as published and a runtime crop
aligned from detector keypoints shows the face at the same scale and place.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from cabin_monitor.messages import FloatArray

# Reference points in image order: right eye (image left), left eye (image
# right), nose tip, right mouth corner, left mouth corner; x, y in [0, 1].
TEMPLATE_5 = np.array(
    [
        [0.325, 0.370],
        [0.675, 0.370],
        [0.500, 0.580],
        [0.355, 0.745],
        [0.645, 0.745],
    ],
    dtype=np.float32,
)

# Mirror permutation of the 68-point iBUG scheme (0-based).
FLIP_68 = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46]  # right eye <- left eye
    + [39, 38, 37, 36, 41, 40]  # left eye <- right eye
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65],  # inner lips
    dtype=np.int64,
)

OUTER_EYE_CORNERS = (36, 45)


def five_points_from_68(landmarks: FloatArray) -> FloatArray:
    """Return the five reference points (eye centres, nose tip, mouth corners) of a 68-point shape."""
    pts = np.asarray(landmarks, dtype=np.float32)
    return np.stack(
        [
            pts[..., 36:42, :].mean(axis=-2),
            pts[..., 42:48, :].mean(axis=-2),
            pts[..., 30, :],
            pts[..., 48, :],
            pts[..., 54, :],
        ],
        axis=-2,
    )


def inter_ocular(landmarks: FloatArray) -> npt.NDArray[np.float32]:
    """Distance between the outer eye corners (points 36 and 45) of 68-point shapes."""
    pts = np.asarray(landmarks, dtype=np.float32)
    a, b = OUTER_EYE_CORNERS
    return np.asarray(np.linalg.norm(pts[..., a, :] - pts[..., b, :], axis=-1), dtype=np.float32)


def similarity_transform(src: FloatArray, dst: FloatArray, weights: FloatArray | None = None) -> FloatArray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src points onto dst, as a 2x3 matrix."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    src_mean = (w[:, None] * src).sum(0)
    dst_mean = (w[:, None] * dst).sum(0)
    s = src - src_mean
    d = dst - dst_mean
    norm = (w * (s**2).sum(1)).sum()
    if norm <= 1e-12:
        raise ValueError("reference points are degenerate (all at one place)")
    a = (w * (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1])).sum() / norm
    b = (w * (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0])).sum() / norm
    rot = np.array([[a, -b], [b, a]])
    shift = dst_mean - rot @ src_mean
    return np.hstack([rot, shift[:, None]]).astype(np.float32)


def cv2_matrix(matrix: FloatArray) -> FloatArray:
    """Convert a 2x3 affine in continuous pixel coordinates (centres at i + 0.5) to OpenCV's convention."""
    m = np.asarray(matrix, dtype=np.float32).copy()
    m[:, 2] += m[:, 0] * 0.5 + m[:, 1] * 0.5 - 0.5
    return m


def invert_affine(matrix: FloatArray) -> FloatArray:
    """Invert a 2x3 affine matrix."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2].astype(np.float32)


def apply_affine(matrix: FloatArray, points: FloatArray) -> FloatArray:
    """Map N x 2 points through a 2x3 affine matrix."""
    pts = np.asarray(points, dtype=np.float32)
    m = np.asarray(matrix, dtype=np.float32)
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def limit_detail(crops: npt.NDArray[np.uint8], detail_px: int) -> npt.NDArray[np.uint8]:
    """Grey crops [N,S,S] brought to the detail of a ``detail_px`` face: area-averaged down, linearly back up.

    This is the path a 48 px FER2013 face takes into the model during training,
    so a sharp camera crop passed through it looks like the faces the emotion
    head learnt from. Crops already at or below ``detail_px`` are returned as they are.
    """
    size = crops.shape[-1]
    if detail_px <= 0 or detail_px >= size:
        return crops
    out = np.empty_like(crops)
    for i, crop in enumerate(crops):
        small = cv2.resize(crop, (detail_px, detail_px), interpolation=cv2.INTER_AREA)
        out[i] = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    return out
