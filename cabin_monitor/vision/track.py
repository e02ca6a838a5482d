"""Occupant tracking: stable ids across frames and seat assignment from image zones."""

from __future__ import annotations

from dataclasses import dataclass

from cabin_monitor.config import TrackerConfig
from cabin_monitor.messages import Face, TrackedFace

Box = tuple[float, float, float, float]


@dataclass
class _Track:
    key: int
    box: Box
    seat: str | None
    last_seen_s: float
    hits: int
    occupant_id: str | None  # set once the track is confirmed


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax1, ay1 = a[0] + a[2], a[1] + a[3]
    bx1, by1 = b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _centre_jump(a: Box, b: Box) -> float:
    """Distance between box centres, in face widths."""
    dx = (a[0] + a[2] / 2) - (b[0] + b[2] / 2)
    dy = (a[1] + a[3] / 2) - (b[1] + b[3] / 2)
    return float((dx * dx + dy * dy) ** 0.5 / max(1.0, (a[2] + b[2]) / 2))


class OccupantTracker:
    """Greedy overlap matching of this frame's faces to tracks.

    A new face is tentative until it has been matched ``confirm_frames``
    frames in a row; only then does it get an occupant id and reach the
    emotion model and the rules. A confirmed occupant keeps its id while
    unseen for up to ``forget_after_s``, and a face back in its seat
    continues it.
    """

    def __init__(self, cfg: TrackerConfig) -> None:
        self.cfg = cfg
        self._tracks: dict[int, _Track] = {}
        self._next_key = 0
        self._next_id = 1

    def seat_of(self, box: Box, frame_w: int, frame_h: int) -> str | None:
        """The first seat zone holding the box centre, if any."""
        cx = (box[0] + box[2] / 2) / max(1, frame_w)
        cy = (box[1] + box[3] / 2) / max(1, frame_h)
        for seat in self.cfg.seats:
            x0, y0, x1, y1 = seat.zone
            if x0 <= cx < x1 and y0 <= cy < y1:
                return seat.name
        return None

    def _match(self, faces: list[Face]) -> dict[int, int]:
        """Face index -> track key, best overlaps first."""
        pairs = []
        for fi, face in enumerate(faces):
            for track in self._tracks.values():
                overlap = iou(face.box, track.box)
                jump = _centre_jump(face.box, track.box)
                if overlap >= self.cfg.min_iou or jump <= self.cfg.max_centre_jump:
                    pairs.append((overlap, -jump, track.occupant_id is not None, fi, track.key))
        pairs.sort(reverse=True)
        assigned: dict[int, int] = {}
        taken: set[int] = set()
        for _, _, _, fi, key in pairs:
            if fi not in assigned and key not in taken:
                assigned[fi] = key
                taken.add(key)
        return assigned

    def update(self, faces: list[Face], now_s: float, frame_w: int, frame_h: int) -> list[TrackedFace]:
        """Confirmed occupants among this frame's faces, each with its occupant id and seat."""
        for stale in [k for k, t in self._tracks.items() if now_s - t.last_seen_s > self.cfg.forget_after_s]:
            del self._tracks[stale]
        assigned = self._match(faces)
        seen: set[int] = set(assigned.values())
        out = []
        for fi, face in enumerate(faces):
            seat = self.seat_of(face.box, frame_w, frame_h)
            key: int | None = assigned.get(fi)
            if key is None and seat is not None:
                # A face back in a seat whose occupant is idle continues that occupant.
                key = next(
                    (t.key for t in self._tracks.values() if t.seat == seat and t.occupant_id and t.key not in seen),
                    None,
                )
            if key is None:
                key = self._next_key
                self._next_key += 1
                self._tracks[key] = _Track(key, face.box, seat, now_s, 0, None)
            seen.add(key)
            track = self._tracks[key]
            track.box, track.seat, track.last_seen_s = face.box, seat, now_s
            track.hits += 1
            if track.occupant_id is None and track.hits >= self.cfg.confirm_frames:
                track.occupant_id = f"occupant-{self._next_id}"
                self._next_id += 1
            if track.occupant_id is not None:
                out.append(TrackedFace(face=face, occupant_id=track.occupant_id, seat=seat))
        # A tentative track missed in a frame was most likely a false detection.
        for missed in [k for k, t in self._tracks.items() if t.occupant_id is None and k not in seen]:
            del self._tracks[missed]
        return out

    def awaiting_confirmation(self) -> bool:
        """Whether a new face has been seen and is not yet confirmed as an occupant."""
        return any(t.occupant_id is None for t in self._tracks.values())

    def live_occupants(self) -> list[str]:
        """Ids of the confirmed occupants not yet forgotten."""
        return [t.occupant_id for t in self._tracks.values() if t.occupant_id is not None]
