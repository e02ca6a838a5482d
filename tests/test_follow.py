"""Tests of following faces by their landmarks between detector runs, and of the per-frame reading budget."""

from __future__ import annotations

import numpy as np

from cabin_monitor.messages import EmotionReading, Face, TrackedFace
from cabin_monitor.vision.follow import (
    FaceFollower,
    ReadingBudget,
    box_around,
    box_shape,
    keypoints_from_landmarks,
)
from cabin_monitor.vision.framing import TEMPLATE_5


def shape_at(x: float, y: float, eyes_px: float) -> np.ndarray:
    """A 68-point shape whose five reference points sit on the template, scaled and placed in a frame."""
    points = np.zeros((68, 2), np.float32)
    scale = eyes_px / float(TEMPLATE_5[1, 0] - TEMPLATE_5[0, 0])
    t = TEMPLATE_5 * scale + np.array([x, y], np.float32)
    points[36:42] = t[0]
    points[42:48] = t[1]
    points[30] = t[2]
    points[48] = t[3]
    points[54] = t[4]
    return points


def tracked(occupant_id: str, landmarks: np.ndarray, frame_id: int = 0) -> TrackedFace:
    """A detected, tracked face whose keypoints come from a 68-point shape, with a box around them."""
    kp = keypoints_from_landmarks(landmarks)
    x0, y0 = kp.min(0) - 20
    x1, y1 = kp.max(0) + 20
    box = (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
    return TrackedFace(Face(frame_id, frame_id / 30, box, 0.9, kp), occupant_id, None)


def reading(occupant_id: str, landmarks: np.ndarray, frame_id: int) -> EmotionReading:
    """A reading with the given landmarks."""
    box = (0.0, 0.0, 1.0, 1.0)
    return EmotionReading(frame_id, frame_id / 30, 0.0, occupant_id, None, box, 0.9, {"neutral": 1.0}, landmarks)


def test_keypoints_from_landmarks_are_eye_centres_nose_tip_and_mouth_centre() -> None:
    """The four keypoints are the eye centres, the nose tip and the middle of the mouth corners."""
    lm = shape_at(100, 50, 40)
    kp = keypoints_from_landmarks(lm)
    np.testing.assert_allclose(kp[0], lm[36], atol=1e-4)
    np.testing.assert_allclose(kp[1], lm[42], atol=1e-4)
    np.testing.assert_allclose(kp[2], lm[30])
    np.testing.assert_allclose(kp[3], (lm[48] + lm[54]) / 2)


def test_a_box_moves_and_scales_with_its_keypoints() -> None:
    """A box kept relative to the keypoints follows them when the face moves and grows."""
    kp = keypoints_from_landmarks(shape_at(100, 50, 40))
    box = (90.0, 40.0, 120.0, 130.0)
    shape = box_shape(box, kp)
    np.testing.assert_allclose(box_around(kp, shape), box, atol=1e-4)
    moved = kp * 2 + np.array([10, 5], np.float32)
    np.testing.assert_allclose(box_around(moved, shape), (2 * 90 + 10, 2 * 40 + 5, 240, 260), atol=1e-3)


def test_the_detector_runs_every_n_frames_and_landmarks_place_the_face_in_between() -> None:
    """With every_frames 3 the detector runs on frames 0, 3, 6; in between the faces sit where the landmarks were."""
    follower = FaceFollower(every_frames=3)
    runs = []
    lm = shape_at(100, 50, 40)
    for i in range(7):
        detect = follower.detect_now(awaiting_confirmation=False)
        runs.append(detect)
        lm = lm + np.array([2, 0], np.float32)  # the face drifts right 2 px a frame
        faces = [] if detect else follower.faces(i, i / 30)
        if not detect:
            assert len(faces) == 1
            np.testing.assert_allclose(faces[0].keypoints, keypoints_from_landmarks(lm - [2, 0]), atol=1e-4)
        follower.observe([tracked("occupant-1", lm, i)], [reading("occupant-1", lm, i)], detect, 640, 360)
    assert runs == [True, False, False, True, False, False, True]


def test_a_new_face_awaiting_confirmation_or_nobody_followed_means_detection() -> None:
    """The detector runs at once while a new face waits to be confirmed, and on every frame of an empty cabin."""
    follower = FaceFollower(every_frames=5)
    assert follower.detect_now(awaiting_confirmation=False)  # nobody followed
    lm = shape_at(100, 50, 40)
    follower.observe([tracked("occupant-1", lm)], [reading("occupant-1", lm, 0)], True, 640, 360)
    assert not follower.detect_now(awaiting_confirmation=False)
    assert follower.detect_now(awaiting_confirmation=True)


def test_implausible_landmarks_drop_the_face_and_call_the_detector() -> None:
    """Landmarks that jump to twice the eye distance or leave the frame end the follow; the next frame detects."""
    for bad in (shape_at(100, 50, 90), shape_at(900, 50, 40)):
        follower = FaceFollower(every_frames=10)
        lm = shape_at(100, 50, 40)
        follower.observe([tracked("occupant-1", lm)], [reading("occupant-1", lm, 0)], True, 640, 360)
        follower.observe([tracked("occupant-1", lm, 1)], [reading("occupant-1", bad, 1)], False, 640, 360)
        assert follower.faces(2, 2 / 30) == []
        assert follower.detect_now(awaiting_confirmation=False)


def test_one_detector_miss_is_filled_in_and_two_let_the_face_go() -> None:
    """A followed face the detector misses once is kept; missed twice in a row, it is no longer followed."""
    follower = FaceFollower(every_frames=1)
    lm = shape_at(100, 50, 40)
    follower.observe([tracked("occupant-1", lm)], [reading("occupant-1", lm, 0)], True, 640, 360)
    filled = follower.fill_in([], 1, 1 / 30)
    assert len(filled) == 1
    follower.observe([TrackedFace(filled[0], "occupant-1", None)], [reading("occupant-1", lm, 1)], True, 640, 360)
    assert follower.fill_in([], 2, 2 / 30) == []


def test_the_budget_reads_five_occupants_in_turn_each_at_three_fifths_of_the_frames() -> None:
    """Five faces, a budget of three, 30 frames: each occupant read 18 times, never twice skipped in a row."""
    budget = ReadingBudget(max_faces=3)
    lm = shape_at(100, 50, 40)
    faces = [tracked(f"occupant-{k}", lm) for k in range(1, 6)]
    reads: dict[str, list[int]] = {f.occupant_id: [] for f in faces}
    for i in range(30):
        chosen = budget.select(faces, i / 30)
        assert len(chosen) == 3
        for face in chosen:
            reads[face.occupant_id].append(i)
    assert {k: len(v) for k, v in reads.items()} == dict.fromkeys(reads, 18)
    assert all(max(np.diff(v)) <= 2 for v in reads.values())


def test_no_budget_or_few_faces_reads_everyone() -> None:
    """A budget of 0, or no more faces than the budget, reads every face on every frame."""
    lm = shape_at(100, 50, 40)
    faces = [tracked(f"occupant-{k}", lm) for k in range(1, 4)]
    assert ReadingBudget(0).select(faces, 0.0) == faces
    assert ReadingBudget(3).select(faces, 0.0) == faces
