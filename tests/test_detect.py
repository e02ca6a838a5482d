"""Tests of both face detector backends on the bundled real photos and video."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from cabin_monitor.assets import sample_path
from cabin_monitor.config import DetectorConfig, DetectRegion
from cabin_monitor.errors import ModelError
from cabin_monitor.messages import Face, Frame
from cabin_monitor.vision.detect import FaceDetector, create_detector, merge_duplicates, shift_face


def frame_of(name: str) -> Frame:
    """A bundled photo as a frame."""
    image = cv2.imread(str(sample_path(name)))
    assert image is not None
    return Frame(frame_id=0, capture_s=0.0, wall_time_s=0.0, image=image)


@pytest.fixture(params=[("blazeface", "short"), ("blazeface", "full"), ("yunet", "short")], ids=lambda p: "-".join(p))
def detector(request: pytest.FixtureRequest) -> Iterator[FaceDetector]:
    """Each backend, closed after the test."""
    kind, rng = request.param
    det = create_detector(DetectorConfig(type=kind, range=rng, min_score=0.5))
    yield det
    det.close()


def test_single_face_is_found_with_keypoints_inside_the_box(detector: FaceDetector) -> None:
    """The one face of single_face.jpg is found; eyes sit above the mouth, left of right, inside the box."""
    faces = detector.detect(frame_of("single_face.jpg"))
    assert len(faces) == 1
    face = faces[0]
    x, y, w, h = face.box
    kp = face.keypoints
    assert kp.shape == (4, 2)
    assert kp[0, 0] < kp[1, 0]  # right eye appears on the image's left
    assert kp[:2, 1].max() < kp[3, 1]  # eyes above the mouth
    assert np.all((kp[:, 0] > x - 0.1 * w) & (kp[:, 0] < x + 1.1 * w))
    assert np.all((kp[:, 1] > y - 0.1 * h) & (kp[:, 1] < y + 1.1 * h))
    assert 0.5 <= face.score <= 1.0


def test_group_photo_faces_are_all_found_by_the_any_size_backends() -> None:
    """YuNet and full-range BlazeFace find the five people in multi_face.jpg."""
    for kind, rng in (("yunet", "short"), ("blazeface", "full")):
        det = create_detector(DetectorConfig(type=kind, range=rng, min_score=0.5))
        try:
            faces = det.detect(frame_of("multi_face.jpg"))
        finally:
            det.close()
        assert len(faces) == 5, kind
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def test_no_face_video_gives_no_faces(detector: FaceDetector) -> None:
    """Frames of the no-face clip produce no detections."""
    cap = cv2.VideoCapture(str(sample_path("no_face.mp4")))
    found = 0
    for i in range(0, 60, 10):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, image = cap.read()
        assert ok
        found += len(detector.detect(Frame(i, 0.0, 0.0, image)))
    cap.release()
    assert found == 0


def test_max_faces_and_min_size_are_applied() -> None:
    """max_faces keeps the best few; min_face_px drops small faces."""
    det = create_detector(DetectorConfig(type="yunet", max_faces=2, min_score=0.5))
    assert len(det.detect(frame_of("multi_face.jpg"))) == 2
    det = create_detector(DetectorConfig(type="yunet", min_face_px=500, min_score=0.5))
    assert det.detect(frame_of("multi_face.jpg")) == []


def test_grey_frames_are_accepted(detector: FaceDetector) -> None:
    """An infrared-style single-channel frame is detected like a colour one."""
    frame = frame_of("single_face.jpg")
    grey = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY)
    assert len(detector.detect(Frame(0, 0.0, 0.0, grey))) == 1


def test_missing_detector_model_is_a_clear_error(tmp_path: object) -> None:
    """A model path that does not exist raises ModelError (as a missing emotion model does) naming it."""
    with pytest.raises(ModelError, match="face detector model not found"):
        create_detector(DetectorConfig(type="yunet", model_path="/nope/yunet.onnx"))  # type: ignore[arg-type]


def test_a_region_crop_maps_boxes_and_keypoints_back_to_frame_pixels_exactly() -> None:
    """A photo pasted into a larger frame and searched through a region finds its faces at the pasted offset."""
    photo = frame_of("single_face.jpg").image
    h, w = photo.shape[:2]
    canvas = np.zeros((h * 2, w * 2, 3), np.uint8)
    dx, dy = w // 2, h
    canvas[dy : dy + h, dx : dx + w] = photo
    zone = (dx / (2 * w), dy / (2 * h), (dx + w) / (2 * w), (dy + h) / (2 * h))
    cfg = DetectorConfig(range="short", min_score=0.5)
    plain = create_detector(cfg)
    regional = create_detector(cfg.model_copy(update={"regions": (DetectRegion(name="rear", zone=zone),)}))
    try:
        direct = plain.detect(Frame(0, 0.0, 0.0, photo))
        mapped = regional.detect(Frame(0, 0.0, 0.0, canvas))
    finally:
        plain.close()
        regional.close()
    assert len(direct) == len(mapped) == 1
    np.testing.assert_allclose(mapped[0].box, np.add(direct[0].box, (dx, dy, 0, 0)), atol=1e-3)
    np.testing.assert_allclose(mapped[0].keypoints, direct[0].keypoints + np.array([dx, dy], np.float32), atol=1e-3)


def test_overlapping_regions_count_a_face_once() -> None:
    """Two overlapping regions that both hold the face give one face, not two."""
    cfg = DetectorConfig(
        range="short",
        min_score=0.5,
        regions=(DetectRegion(name="a", zone=(0.0, 0.0, 1.0, 1.0)), DetectRegion(name="b", zone=(0.0, 0.0, 1.0, 1.0))),
    )
    det = create_detector(cfg)
    try:
        assert len(det.detect(frame_of("single_face.jpg"))) == 1
    finally:
        det.close()


def test_both_ranges_find_the_near_face_once_and_the_far_faces_of_the_group_photo() -> None:
    """Short and full range together find the single face once, and at least what full range finds alone."""
    both = create_detector(DetectorConfig(range="both", min_score=0.5))
    full = create_detector(DetectorConfig(range="full", min_score=0.5, max_faces=32))
    try:
        assert len(both.detect(frame_of("single_face.jpg"))) == 1
        group = frame_of("multi_face.jpg")
        found_both = create_detector(DetectorConfig(range="both", min_score=0.5, max_faces=32))
        try:
            assert len(found_both.detect(group)) >= len(full.detect(group)) >= 2
        finally:
            found_both.close()
    finally:
        both.close()
        full.close()


def test_shift_and_merge_are_exact_and_keep_the_best_score() -> None:
    """A shifted face moves by exactly the offset; of two overlapping faces the higher score stays."""
    face = Face(0, 0.0, (10.0, 20.0, 30.0, 30.0), 0.7, np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float32))
    moved = shift_face(face, 100, 50)
    assert moved.box == (110.0, 70.0, 30.0, 30.0)
    np.testing.assert_array_equal(moved.keypoints, face.keypoints + np.array([100, 50], np.float32))
    better = Face(0, 0.0, (12.0, 21.0, 30.0, 30.0), 0.9, face.keypoints)
    elsewhere = Face(0, 0.0, (200.0, 20.0, 30.0, 30.0), 0.5, face.keypoints)
    assert merge_duplicates([face, better, elsewhere]) == [better, elsewhere]
