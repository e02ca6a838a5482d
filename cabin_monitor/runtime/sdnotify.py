"""The systemd notification protocol (READY, WATCHDOG, STOPPING, STATUS), spoken directly."""

from __future__ import annotations

import os
import socket


class SystemdNotifier:
    """Sends datagrams to $NOTIFY_SOCKET; does nothing when not run by systemd."""

    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = ("\0" + path[1:]) if path.startswith("@") else path
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is set."""
        return self._sock is not None

    def watchdog_interval_s(self) -> float | None:
        """Half of $WATCHDOG_USEC (the recommended ping period), if the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 2e6 if value > 0 else None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines; False when there is no socket or sending failed.

        Never blocks: with the receiver's queue full the notification is dropped (the queue already holds
        earlier ones), rather than hanging the supervising loop that sends it.
        """
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "running") -> bool:
        """Start-up is complete."""
        return self.notify("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        """The service is alive (its stage threads are making progress)."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        """A one-line status for systemctl status."""
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
