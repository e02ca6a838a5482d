"""One frame through every stage: detect, track, align, read emotions, apply the rules (and the shadow
rules, when a shadow set runs: a second engine on the same observations, no more model work).

``FrameProcessor`` holds the stages and runs them in order on the calling
thread (``runtime.pipeline``'s inference thread); the aligned faces are read
through ``vision.reader``, as still images are.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cv2

from cabin_monitor.config import Config, RulesConfig
from cabin_monitor.messages import EmotionReading, Frame, FrameResult
from cabin_monitor.rules import RulesEngine
from cabin_monitor.vision.align import grey
from cabin_monitor.vision.detect import FaceDetector, create_detector
from cabin_monitor.vision.emotion import EmotionModel
from cabin_monitor.vision.follow import FaceFollower, ReadingBudget
from cabin_monitor.vision.reader import FaceReader
from cabin_monitor.vision.track import OccupantTracker

STAGES = ("detect", "track", "align", "emotion", "rules")


class FrameProcessor:
    """The per-frame stages of the daemon, wired in order."""

    def __init__(
        self,
        cfg: Config,
        model: EmotionModel | None = None,
        detector: FaceDetector | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model or EmotionModel(cfg.emotion)
        # Before the detector: rules that do not fit the model fail here, with nothing to release.
        self.rules = RulesEngine(cfg.rules, self.model.class_names)
        self.shadow = None if cfg.rules_shadow is None else RulesEngine(cfg.rules_shadow, self.model.class_names)
        self.detector = detector or create_detector(cfg.detector)
        self.tracker = OccupantTracker(cfg.tracker)
        self.follower = FaceFollower(cfg.detector.every_frames)
        self.budget = ReadingBudget(cfg.emotion.max_faces_per_frame)
        self.reader = FaceReader(self.model)
        self._clock = clock
        # Pixels stay in memory unless the operator explicitly asks for crops on disk.
        self._crops_dir = cfg.privacy.crops_dir if cfg.privacy.save_crops else None
        if self._crops_dir is not None:
            self._crops_dir.mkdir(parents=True, exist_ok=True)

    def reconfigure_rules(self, rules: RulesConfig) -> None:
        """Swap rule thresholds between frames: rules in force, which ``check_classes`` accepted for this model."""
        self.rules.reconfigure(rules, checked=True)

    def reconfigure_shadow(self, rules: RulesConfig | None) -> None:
        """Swap the shadow rules between frames (checked like ``reconfigure_rules``'s); None stops the shadow
        engine, whose open events the caller has closed (``RulesEngine.close_all``)."""
        if rules is None:
            self.shadow = None
        elif self.shadow is None:
            self.shadow = RulesEngine(rules, self.model.class_names)
        else:
            self.shadow.reconfigure(rules, checked=True)

    def process(self, frame: Frame) -> FrameResult:
        """Run every stage on one frame and time each."""
        t = self._clock()
        stage_ms: dict[str, float] = {}

        def lap(name: str) -> None:
            nonlocal t
            now = self._clock()
            stage_ms[name] = (now - t) * 1000.0
            t = now

        detected = self.follower.detect_now(self.tracker.awaiting_confirmation())
        if detected:
            faces = self.follower.fill_in(self.detector.detect(frame), frame.frame_id, frame.capture_s)
        else:
            faces = self.follower.faces(frame.frame_id, frame.capture_s)
        lap("detect")
        h, w = frame.image.shape[:2]
        tracked = self.tracker.update(faces, frame.capture_s, w, h)
        lap("track")
        gray = grey(frame.image)
        aligned = [self.reader.aligner.align(gray, tf) for tf in self.budget.select(tracked, frame.capture_s)]
        if self._crops_dir is not None:
            for face in aligned:
                cv2.imwrite(str(self._crops_dir / f"{frame.frame_id:08d}_{face.tracked.occupant_id}.png"), face.crop)
        lap("align")
        readings = [
            EmotionReading(
                frame_id=frame.frame_id,
                capture_s=frame.capture_s,
                wall_time_s=frame.wall_time_s,
                occupant_id=face.tracked.occupant_id,
                seat=face.tracked.seat,
                box=face.tracked.face.box,
                face_score=face.tracked.face.score,
                emotions=reading.emotions,
                landmarks=reading.landmarks,
            )
            for face, reading in zip(aligned, self.reader.read(aligned), strict=True)
        ]
        self.follower.observe(tracked, readings, detected, w, h)
        lap("emotion")
        observations = [r.observation() for r in readings]
        events = self.rules.update(observations, frame.capture_s, frame.wall_time_s)
        shadow = () if self.shadow is None else self.shadow.update(observations, frame.capture_s, frame.wall_time_s)
        lap("rules")
        return FrameResult(
            frame=frame,
            readings=tuple(readings),
            events=tuple(events),
            shadow_events=tuple(shadow),
            stage_ms=stage_ms,
            faces_in_view=len(tracked),
            detected=detected,
        )

    def close(self) -> None:
        """Release the detector."""
        self.detector.close()
