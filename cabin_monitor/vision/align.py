"""Alignment: detector keypoints -> canonical grey crop, and model landmarks -> frame pixels."""

from __future__ import annotations

import cv2
import numpy as np

from cabin_monitor.messages import AlignedFace, Face, FloatArray, ImageArray, TrackedFace
from cabin_monitor.vision.framing import TEMPLATE_5, apply_affine, cv2_matrix, invert_affine, similarity_transform

# Template positions of the detector keypoints (right eye, left eye, nose tip,
# mouth centre). The mouth counts twice, as its two corners do in the
# five-point fit that framed the training crops.
KEYPOINT_TEMPLATE = np.array(
    [TEMPLATE_5[0], TEMPLATE_5[1], TEMPLATE_5[2], (TEMPLATE_5[3] + TEMPLATE_5[4]) / 2], dtype=np.float32
)
KEYPOINT_WEIGHTS = np.array([1.0, 1.0, 1.0, 2.0], dtype=np.float32)


def grey(image: ImageArray) -> ImageArray:
    """A single-channel view of a BGR or grey image."""
    if image.ndim == 2:
        return image
    return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), dtype=np.uint8)


def keypoints_to_crop(keypoints: FloatArray, crop_px: int) -> FloatArray:
    """The similarity (2x3, continuous coordinates) that takes detector keypoints onto the canonical crop."""
    return similarity_transform(keypoints, KEYPOINT_TEMPLATE * crop_px, KEYPOINT_WEIGHTS)


def warp_crop(gray: ImageArray, frame_to_crop: FloatArray, crop_px: int) -> ImageArray:
    """Resample the crop, averaging first when the face is much larger than the crop (no aliasing)."""
    m = np.asarray(frame_to_crop, dtype=np.float32)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if scale < 0.5:
        # Shrink the face's neighbourhood with area averaging so the final warp
        # is close to 1:1, then fold the shrink into the matrix.
        inv = invert_affine(m)
        corners = apply_affine(inv, np.array([[0, 0], [crop_px, 0], [0, crop_px], [crop_px, crop_px]], np.float32))
        x0, y0 = np.floor(corners.min(0)).astype(int) - 2
        x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
        h, w = gray.shape[:2]
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            k = 2.0 * scale
            roi = gray[y0:y1, x0:x1]
            size = (max(1, round((x1 - x0) * k)), max(1, round((y1 - y0) * k)))
            small = cv2.resize(roi, size, interpolation=cv2.INTER_AREA)
            kx, ky = size[0] / (x1 - x0), size[1] / (y1 - y0)
            to_small = np.array([[kx, 0, -x0 * kx], [0, ky, -y0 * ky]], dtype=np.float32)
            m = _compose(m, invert_affine(to_small))
            gray = small
    out = cv2.warpAffine(
        gray, cv2_matrix(m), (crop_px, crop_px), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return np.asarray(out, dtype=np.uint8)


def _compose(outer: FloatArray, inner: FloatArray) -> FloatArray:
    """outer ∘ inner for 2x3 affines."""
    o = np.vstack([outer, [0, 0, 1]])
    i = np.vstack([inner, [0, 0, 1]])
    return np.asarray((o @ i)[:2], dtype=np.float32)


def warp_crop_at_detail(gray: ImageArray, frame_to_crop: FloatArray, crop_px: int, detail_px: int) -> ImageArray:
    """The crop cut at ``detail_px`` and scaled up linearly to ``crop_px`` (``warp_crop`` when it adds no detail).

    Training faces reach the model this way (48 px FER2013 faces scaled up to the
    input), so a sharp camera face cut like this looks like them to the emotion head.
    """
    if not 0 < detail_px < crop_px:
        return warp_crop(gray, frame_to_crop, crop_px)
    to_detail = np.asarray(frame_to_crop, dtype=np.float32) * (detail_px / crop_px)
    small = warp_crop(gray, to_detail, detail_px)
    return np.asarray(cv2.resize(small, (crop_px, crop_px), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)


class FaceAligner:
    """Cuts the canonical crop the model expects out of a frame, at the model's detail level."""

    def __init__(self, crop_px: int, detail_px: int = 0) -> None:
        self.crop_px = crop_px
        self.detail_px = detail_px

    def crop(self, gray_frame: ImageArray, face: Face) -> tuple[ImageArray, FloatArray]:
        """The canonical crop of one face, and its frame-to-crop transform."""
        matrix = keypoints_to_crop(face.keypoints, self.crop_px)
        return self.warp(gray_frame, matrix), matrix

    def warp(self, gray_frame: ImageArray, frame_to_crop: FloatArray) -> ImageArray:
        """The crop that ``frame_to_crop`` cuts, at this aligner's detail level."""
        return warp_crop_at_detail(gray_frame, frame_to_crop, self.crop_px, self.detail_px)

    def align(self, gray_frame: ImageArray, tracked: TrackedFace) -> AlignedFace:
        """The canonical crop of one tracked face."""
        crop, matrix = self.crop(gray_frame, tracked.face)
        return AlignedFace(tracked=tracked, crop=crop, frame_to_crop=matrix)

    def box_matrix(self, box: tuple[float, float, float, float]) -> FloatArray:
        """The crop transform for a face known only by its box (the whole box is the crop)."""
        x, y, w, h = box
        side = max(w, h)
        cx, cy = x + w / 2, y + h / 2
        s = self.crop_px / side
        return np.array([[s, 0, self.crop_px / 2 - s * cx], [0, s, self.crop_px / 2 - s * cy]], dtype=np.float32)


def landmarks_to_frame(landmarks_crop: FloatArray, frame_to_crop: FloatArray) -> FloatArray:
    """Map landmarks from crop pixels back to frame pixels."""
    return apply_affine(invert_affine(frame_to_crop), landmarks_crop)
