"""Occupant tracking: stable ids across frames and seat assignment from image zones."""

from __future__ import annotations

from dataclasses import dataclass

from cabin_monitor.config import TrackerConfig
from cabin_monitor.messages import Face, TrackedFace


@dataclass
class _Track:
    occupant_id: str
    box: tuple[float, float, float, float]
    seat: str | None
    last_seen_s: float


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax1, ay1 = a[0] + a[2], a[1] + a[3]
    bx1, by1 = b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _centre_jump(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Distance between box centres, in face widths."""
    dx = (a[0] + a[2] / 2) - (b[0] + b[2] / 2)
    dy = (a[1] + a[3] / 2) - (b[1] + b[3] / 2)
    return float((dx * dx + dy * dy) ** 0.5 / max(1.0, (a[2] + b[2]) / 2))


class OccupantTracker:
    """Greedy overlap matching of this frame's faces to live tracks; a seat keeps its occupant's id."""

    def __init__(self, cfg: TrackerConfig) -> None:
        self.cfg = cfg
        self._tracks: dict[str, _Track] = {}
        self._next_id = 1

    def seat_of(self, box: tuple[float, float, float, float], frame_w: int, frame_h: int) -> str | None:
        """The first seat zone holding the box centre, if any."""
        cx = (box[0] + box[2] / 2) / max(1, frame_w)
        cy = (box[1] + box[3] / 2) / max(1, frame_h)
        for seat in self.cfg.seats:
            x0, y0, x1, y1 = seat.zone
            if x0 <= cx < x1 and y0 <= cy < y1:
                return seat.name
        return None

    def update(self, faces: list[Face], now_s: float, frame_w: int, frame_h: int) -> list[TrackedFace]:
        """Assign every face an occupant id (new or continued) and a seat."""
        for stale_id in [k for k, t in self._tracks.items() if now_s - t.last_seen_s > self.cfg.forget_after_s]:
            del self._tracks[stale_id]

        pairs = []
        for fi, face in enumerate(faces):
            for track in self._tracks.values():
                overlap = iou(face.box, track.box)
                jump = _centre_jump(face.box, track.box)
                if overlap >= self.cfg.min_iou or jump <= self.cfg.max_centre_jump:
                    pairs.append((overlap, -jump, fi, track.occupant_id))
        pairs.sort(reverse=True)

        assigned: dict[int, str] = {}
        taken: set[str] = set()
        for _, _, fi, track_id in pairs:
            if fi in assigned or track_id in taken:
                continue
            assigned[fi] = track_id
            taken.add(track_id)

        out = []
        for fi, face in enumerate(faces):
            seat = self.seat_of(face.box, frame_w, frame_h)
            occupant_id: str | None = assigned.get(fi)
            if occupant_id is None and seat is not None:
                # A face back in a seat whose occupant's track is idle continues that occupant.
                occupant_id = next(
                    (t.occupant_id for t in self._tracks.values() if t.seat == seat and t.occupant_id not in taken),
                    None,
                )
            if occupant_id is None:
                occupant_id = f"occupant-{self._next_id}"
                self._next_id += 1
            taken.add(occupant_id)
            self._tracks[occupant_id] = _Track(occupant_id, face.box, seat, now_s)
            out.append(TrackedFace(face=face, occupant_id=occupant_id, seat=seat))
        return out

    def live_occupants(self) -> list[str]:
        """Ids of the tracks not yet forgotten."""
        return list(self._tracks)
