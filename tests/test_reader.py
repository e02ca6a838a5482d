"""Tests of the chain from faces to readings, on the bundled photos and the real model."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from cabin_monitor.assets import sample_path
from cabin_monitor.config import DetectorConfig, EmotionConfig
from cabin_monitor.messages import Frame, TrackedFace
from cabin_monitor.vision.align import FaceAligner, grey, warp_crop
from cabin_monitor.vision.detect import FaceDetector, create_detector
from cabin_monitor.vision.emotion import EmotionModel
from cabin_monitor.vision.reader import FaceReader, crop_image


@pytest.fixture(scope="module")
def reader() -> FaceReader:
    """The bundled emotion model behind its aligner."""
    return FaceReader(EmotionModel(EmotionConfig()))


@pytest.fixture
def yunet() -> Iterator[FaceDetector]:
    """YuNet with the small-face limit the still-image tools use."""
    detector = create_detector(DetectorConfig(type="yunet", min_face_px=16))
    yield detector
    detector.close()


def test_crop_image_cuts_each_detected_face_as_the_aligner_does(yunet: FaceDetector) -> None:
    """Every face in the five-face photo gets its box, score and the aligner's crop of it."""
    image = cv2.imread(str(sample_path("multi_face.jpg")))
    faces = yunet.detect(Frame(0, 0.0, 0.0, image))
    crops = crop_image(image, FaceAligner(64), yunet)
    assert len(crops) == len(faces) == 5
    aligner = FaceAligner(64)
    for face, crop in zip(faces, crops, strict=True):
        expected, matrix = aligner.crop(grey(image), face)
        assert crop.box == face.box and crop.score == face.score
        assert np.array_equal(crop.crop, expected) and np.array_equal(crop.frame_to_crop, matrix)


def test_without_a_detector_the_whole_image_is_one_face() -> None:
    """With no detector the image is taken as one pre-cropped face, box the whole image, score 1."""
    image = cv2.imread(str(sample_path("single_face.jpg")))
    h, w = image.shape[:2]
    (crop,) = crop_image(image, FaceAligner(64), None)
    assert crop.box == (0.0, 0.0, float(w), float(h)) and crop.score == 1.0
    assert crop.crop.shape == (64, 64) and crop.crop.dtype == np.uint8
    assert np.array_equal(crop.crop, warp_crop(grey(image), FaceAligner(64).box_matrix(crop.box), 64))


def test_readings_have_every_class_and_landmarks_on_the_face(reader: FaceReader, yunet: FaceDetector) -> None:
    """Each face's probabilities follow the model's classes and sum to 1; its 68 landmarks lie in its box."""
    image = cv2.imread(str(sample_path("multi_face.jpg")))
    crops = crop_image(image, reader.aligner, yunet)
    readings = reader.read(crops)
    assert len(readings) == len(crops) == 5
    for crop, reading in zip(crops, readings, strict=True):
        assert tuple(reading.emotions) == reader.model.class_names
        assert abs(sum(reading.emotions.values()) - 1.0) < 1e-3
        x, y, w, h = crop.box
        cx, cy = reading.landmarks.mean(0)
        assert reading.landmarks.shape == (68, 2) and x < cx < x + w and y < cy < y + h
    assert reader.read([]) == []


def test_the_daemon_and_the_still_image_paths_read_a_face_alike(reader: FaceReader, yunet: FaceDetector) -> None:
    """A tracked face aligned as the daemon does and the same face cut from a still read the same."""
    image = cv2.imread(str(sample_path("single_face.jpg")))
    (face,) = yunet.detect(Frame(0, 0.0, 0.0, image))
    aligned = reader.aligner.align(grey(image), TrackedFace(face, "occupant-1", None))
    (from_tracking,) = reader.read([aligned])
    (from_still,) = reader.read(crop_image(image, reader.aligner, yunet))
    assert from_tracking.emotions == pytest.approx(from_still.emotions)
    assert np.allclose(from_tracking.landmarks, from_still.landmarks)
