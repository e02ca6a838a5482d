"""What the pipeline records through: the inference thread hands over, the recorder never makes it wait."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cabin_monitor.config import RulesConfig
from cabin_monitor.messages import Event, FrameResult
from cabin_monitor.rules import OccupantState


class RecordingSink(Protocol):
    """Takes every input of the rules engine and every event it emitted, in order."""

    def start(self) -> None:
        """Begin writing (starts the writer thread)."""

    def record_frame(self, result: FrameResult, occupants: Sequence[OccupantState]) -> None:
        """One processed frame: its readings and events, and the engine's occupants after it."""

    def record_rules(self, rules: RulesConfig, capture_s: float, wall_time_s: float) -> None:
        """The rules changed; in force from the next frame."""

    def record_close(self, events: Sequence[Event], capture_s: float, wall_time_s: float) -> None:
        """The engine ended every open event at shutdown."""

    def stop(self, timeout_s: float) -> None:
        """Write what is pending, close the file, stop the thread (waiting up to ``timeout_s``)."""
