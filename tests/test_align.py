"""Tests of keypoint alignment and the canonical crop."""

from __future__ import annotations

import cv2
import numpy as np

from cabin_monitor.assets import sample_path
from cabin_monitor.config import DetectorConfig
from cabin_monitor.messages import Face, Frame, TrackedFace
from cabin_monitor.vision.align import (
    KEYPOINT_TEMPLATE,
    FaceAligner,
    grey,
    keypoints_to_crop,
    landmarks_to_frame,
    warp_crop,
    warp_crop_at_detail,
)
from cabin_monitor.vision.detect import create_detector
from cabin_monitor.vision.framing import apply_affine


def detected_face(image: np.ndarray) -> Face:
    """The single face YuNet finds in an image."""
    det = create_detector(DetectorConfig(type="yunet", min_score=0.5))
    faces = det.detect(Frame(0, 0.0, 0.0, image))
    assert len(faces) == 1
    return faces[0]


def test_template_shaped_keypoints_map_exactly() -> None:
    """Keypoints that are a scaled, shifted template land on the template."""
    kp = KEYPOINT_TEMPLATE * 300 + np.array([40, 25], np.float32)
    m = keypoints_to_crop(kp, 112)
    assert np.allclose(apply_affine(m, kp), KEYPOINT_TEMPLATE * 112, atol=1e-3)


def test_landmarks_round_trip_between_crop_and_frame() -> None:
    """landmarks_to_frame inverts the frame-to-crop transform."""
    kp = np.array([[200, 210], [260, 205], [230, 250], [232, 280]], np.float32)
    m = keypoints_to_crop(kp, 112)
    pts = np.random.default_rng(1).uniform(0, 112, size=(68, 2)).astype(np.float32)
    assert np.allclose(apply_affine(m, landmarks_to_frame(pts, m)), pts, atol=1e-3)


def test_real_face_crop_puts_the_eyes_on_the_template() -> None:
    """Detecting again inside the aligned crop finds the eyes near the template's eye positions."""
    image = cv2.imread(str(sample_path("single_face.jpg")))
    face = detected_face(image)
    aligned = FaceAligner(112).align(grey(image), TrackedFace(face, "o", None))
    assert aligned.crop.shape == (112, 112) and aligned.crop.dtype == np.uint8
    eyes_in_crop = apply_affine(aligned.frame_to_crop, face.keypoints[:2])
    assert np.abs(eyes_in_crop - KEYPOINT_TEMPLATE[:2] * 112).max() < 6.0


def test_a_face_is_cropped_without_tracking() -> None:
    """crop takes a detected face as it is: the same crop and transform as align gives its tracked face."""
    image = cv2.imread(str(sample_path("single_face.jpg")))
    face = detected_face(image)
    aligner = FaceAligner(112)
    crop, matrix = aligner.crop(grey(image), face)
    aligned = aligner.align(grey(image), TrackedFace(face, "occupant-1", "driver"))
    assert np.array_equal(crop, aligned.crop) and np.array_equal(matrix, aligned.frame_to_crop)
    assert aligned.tracked.occupant_id == "occupant-1"


def test_big_faces_are_shrunk_without_aliasing() -> None:
    """A face four times larger gives nearly the same crop as the original (area-averaged shrink)."""
    image = cv2.imread(str(sample_path("single_face.jpg")))
    big = cv2.resize(image, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    face = detected_face(image)
    m_small = keypoints_to_crop(face.keypoints, 112)
    m_big = keypoints_to_crop(face.keypoints * 4, 112)
    crop_small = warp_crop(grey(image), m_small, 112).astype(np.float32)
    crop_big = warp_crop(grey(big), m_big, 112).astype(np.float32)
    assert np.abs(crop_small - crop_big).mean() < 6.0


def test_box_matrix_maps_the_box_onto_the_crop() -> None:
    """A square box's corners go to the crop's corners."""
    m = FaceAligner(112).box_matrix((10.0, 20.0, 200.0, 200.0))
    corners = apply_affine(m, np.array([[10, 20], [210, 220]], np.float32))
    assert np.allclose(corners, [[0, 0], [112, 112]], atol=1e-4)


def test_a_crop_at_detail_is_the_small_crop_scaled_up() -> None:
    """Cut at 48 px of detail, a 64 px crop is the 48 px cut of the same face scaled up linearly."""
    image = cv2.imread(str(sample_path("single_face.jpg")))
    gray = grey(image)
    matrix = FaceAligner(64).box_matrix((100.0, 40.0, 220.0, 220.0))
    small = warp_crop(gray, matrix * (48 / 64), 48)
    expected = cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(warp_crop_at_detail(gray, matrix, 64, 48), expected)
    assert np.array_equal(warp_crop_at_detail(gray, matrix, 64, 0), warp_crop(gray, matrix, 64))
    assert np.array_equal(warp_crop_at_detail(gray, matrix, 64, 64), warp_crop(gray, matrix, 64))


def test_detail_level_changes_the_pixels_not_the_geometry() -> None:
    """An aligner at 48 px of detail cuts the face with the same transform, and a softer crop."""
    image = cv2.imread(str(sample_path("single_face.jpg")))
    face = detected_face(image)
    sharp, m_sharp = FaceAligner(64).crop(grey(image), face)
    soft, m_soft = FaceAligner(64, 48).crop(grey(image), face)
    assert np.array_equal(m_sharp, m_soft)
    assert (
        np.abs(np.diff(soft.astype(np.float32), axis=1)).mean()
        < np.abs(np.diff(sharp.astype(np.float32), axis=1)).mean()
    )
