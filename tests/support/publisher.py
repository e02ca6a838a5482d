"""A publisher that records what the outbox sender hands it, for the sender's unit tests (no broker)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecordingPublisher:
    """Records each publish and gives it the next message id; ``down`` makes it refuse like a link going down."""

    down: bool = False
    max_payload_bytes: int | None = None  # a broker's packet limit, as the payload size it leaves
    sent: list[tuple[int, str, bytes]] = field(default_factory=list)  # (mid, topic, payload)
    _next_mid: int = 0

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> int | None:
        """The next message id, or None while ``down``."""
        assert qos == 1 and not retain, "events go at QoS 1, not retained"
        if self.down:
            return None
        self._next_mid += 1
        self.sent.append((self._next_mid, topic, payload))
        return self._next_mid

    def fits(self, topic: str, payload: bytes, *, qos: int) -> bool:
        """Whether ``payload`` is within ``max_payload_bytes``."""
        return self.max_payload_bytes is None or len(payload) <= self.max_payload_bytes

    def take(self) -> list[tuple[int, str]]:
        """``(mid, payload text)`` of what was published since the last take."""
        taken = [(mid, payload.decode()) for mid, _, payload in self.sent]
        self.sent.clear()
        return taken
