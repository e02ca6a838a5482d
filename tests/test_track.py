"""Tests of occupant tracking and seat assignment."""

from __future__ import annotations

import numpy as np

from cabin_monitor.config import SeatZone, TrackerConfig
from cabin_monitor.messages import Face
from cabin_monitor.vision.track import OccupantTracker, iou

SEATS = (
    SeatZone(name="driver", zone=(0.0, 0.0, 0.5, 1.0)),
    SeatZone(name="front_passenger", zone=(0.5, 0.0, 1.0, 1.0)),
)


def face(x: float, y: float, w: float = 100.0, frame_id: int = 0) -> Face:
    """A face box at (x, y)."""
    return Face(frame_id=frame_id, capture_s=0.0, box=(x, y, w, w), score=0.9, keypoints=np.zeros((4, 2), np.float32))


def test_iou_of_identical_and_disjoint_boxes() -> None:
    """Identical boxes overlap fully, disjoint ones not at all."""
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 10, 10)) == 0.0


def test_ids_stay_stable_while_faces_move() -> None:
    """Two faces drifting across frames keep their occupant ids."""
    tracker = OccupantTracker(TrackerConfig(confirm_frames=1))
    first = tracker.update([face(100, 100), face(900, 100)], 0.0, 1280, 720)
    ids = [t.occupant_id for t in first]
    assert len(set(ids)) == 2
    for step in range(1, 30):
        later = tracker.update([face(900 - step * 2, 100), face(100 + step * 3, 100)], step / 30, 1280, 720)
        assert [t.occupant_id for t in later] == ids[::-1]


def test_seat_comes_from_the_zone_holding_the_box_centre() -> None:
    """Faces on the left and right halves get the driver and passenger seats."""
    tracker = OccupantTracker(TrackerConfig(seats=SEATS, confirm_frames=1))
    tracked = tracker.update([face(100, 100), face(900, 100)], 0.0, 1280, 720)
    assert [t.seat for t in tracked] == ["driver", "front_passenger"]


def test_a_face_returning_to_its_seat_keeps_the_occupant_id() -> None:
    """After a gap, a face back in the same seat continues the seat's occupant."""
    tracker = OccupantTracker(TrackerConfig(seats=SEATS, confirm_frames=1))
    first = tracker.update([face(100, 100)], 0.0, 1280, 720)[0]
    tracker.update([], 1.0, 1280, 720)
    back = tracker.update([face(400, 300)], 2.0, 1280, 720)[0]
    assert back.occupant_id == first.occupant_id


def test_a_face_elsewhere_after_the_track_is_forgotten_is_new() -> None:
    """Tracks unseen for longer than forget_after_s are dropped, so a later face gets a fresh id."""
    tracker = OccupantTracker(TrackerConfig(forget_after_s=1.0, confirm_frames=1))
    first = tracker.update([face(100, 100)], 0.0, 1280, 720)[0]
    again = tracker.update([face(100, 100)], 5.0, 1280, 720)[0]
    assert again.occupant_id != first.occupant_id


def test_new_faces_need_consecutive_detections_to_become_occupants() -> None:
    """A face seen in one frame only never becomes an occupant; one seen three frames running does."""
    tracker = OccupantTracker(TrackerConfig(confirm_frames=3))
    assert tracker.update([face(100, 100)], 0.0, 1280, 720) == []
    assert tracker.update([], 0.03, 1280, 720) == []
    assert tracker.update([face(100, 100)], 0.06, 1280, 720) == []
    assert tracker.update([face(102, 100)], 0.1, 1280, 720) == []
    confirmed = tracker.update([face(104, 100)], 0.13, 1280, 720)
    assert [t.occupant_id for t in confirmed] == ["occupant-1"]
    assert tracker.live_occupants() == ["occupant-1"]


def test_a_confirmed_occupant_missed_for_a_frame_keeps_its_id() -> None:
    """Once confirmed, a missed detection does not reset the occupant."""
    tracker = OccupantTracker(TrackerConfig(confirm_frames=2))
    tracker.update([face(100, 100)], 0.0, 1280, 720)
    first = tracker.update([face(100, 100)], 0.03, 1280, 720)[0]
    tracker.update([], 0.06, 1280, 720)
    again = tracker.update([face(101, 100)], 0.1, 1280, 720)[0]
    assert again.occupant_id == first.occupant_id
