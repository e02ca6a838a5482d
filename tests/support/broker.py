"""A real Mosquitto broker on a free port and a recording subscriber, for tests that talk MQTT.

Tests talk to a real broker rather than patching paho. ``MosquittoBroker`` needs the ``mosquitto``
binary (``apt-get install -y mosquitto``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cabin_monitor.config import parse_mqtt_url
from tests.support.pki import TestPki

MOSQUITTO_FALLBACK = "/usr/sbin/mosquitto"


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` broker binary; raises ``FileNotFoundError`` saying how to install it."""
    found = shutil.which("mosquitto") or (MOSQUITTO_FALLBACK if os.access(MOSQUITTO_FALLBACK, os.X_OK) else None)
    if found is None:
        raise FileNotFoundError(
            "the mosquitto broker is needed by these tests and was not found on PATH or at "
            f"{MOSQUITTO_FALLBACK}; install it with: apt-get install -y mosquitto"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def password_file_line(username: str, password: str) -> str:
    """A Mosquitto password-file line (salted SHA-512, the ``$6$`` format ``mosquitto_passwd`` understands)."""
    salt = os.urandom(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{username}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class MosquittoBroker:
    """A private Mosquitto on a free 127.0.0.1 port, configured in its own folder.

    ``persistence=True`` keeps retained messages and persistent sessions (with their queued QoS 1
    messages) across ``stop()``/``restart()``; ``kill()`` loses what was not saved. With ``pki`` a
    second, TLS listener is opened (``tls_url``); ``require_certificate`` asks clients for a
    certificate signed by the same CA. ``passwords`` (username -> password) adds a password file;
    anonymous clients stay allowed. ``acl`` is the text of an ACL file (Mosquitto's format: topic
    lines before the first ``user`` line are for anonymous clients); ``set_acl`` and ``reload``
    change it while the broker runs. ``max_packet_bytes`` is Mosquitto's ``max_packet_size``, sent to MQTT 5
    clients in the CONNACK.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        persistence: bool = False,
        pki: TestPki | None = None,
        require_certificate: bool = False,
        passwords: Mapping[str, str] | None = None,
        acl: str | None = None,
        start_timeout_s: float = 10.0,
        max_packet_bytes: int | None = None,
    ) -> None:
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="mosquitto-")) if directory is None else directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if pki is not None else None
        self.persistence = persistence
        self.pki = pki
        self.require_certificate = require_certificate
        self.passwords = dict(passwords or {})
        self.acl = acl
        self.acl_file = self.directory / "acl"
        self.start_timeout_s = start_timeout_s
        self.max_packet_bytes = max_packet_bytes
        self.config_file = self.directory / "mosquitto.conf"
        self.log_file = self.directory / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` of the plain listener."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """``mqtts://127.0.0.1:PORT`` of the TLS listener (only with ``pki``)."""
        if self.tls_port is None:
            raise ValueError("this broker has no TLS listener (pass pki=...)")
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def _write_config(self) -> None:
        lines = [
            # Mosquitto started as root drops to the 'mosquitto' user, which could not read this folder.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "allow_anonymous true",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.max_packet_bytes is not None:
            lines.append(f"max_packet_size {self.max_packet_bytes}")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.directory}/", "autosave_interval 1"]
        if self.passwords:
            pw_file = self.directory / "passwords"
            pw_file.write_text("".join(password_file_line(u, p) + "\n" for u, p in self.passwords.items()))
            lines.append(f"password_file {pw_file}")
        if self.acl is not None:
            self.acl_file.write_text(self.acl)
            lines.append(f"acl_file {self.acl_file}")
        if self.pki is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.pki.ca_file}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        self.config_file.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the broker and wait (bounded) until every listener accepts connections."""
        if self._process is not None:
            raise RuntimeError("broker already running")
        self._write_config()
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.config_file)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.start_timeout_s
        for port in (self.port, self.tls_port):
            while port is not None:
                if self._process.poll() is not None:
                    code = self._process.returncode
                    self._process = None
                    raise RuntimeError(f"mosquitto exited with status {code}:\n{self.log_text()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise TimeoutError(f"mosquitto did not listen on port {port}:\n{self.log_text()}") from None
                    time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait: Mosquitto saves its persistence file and closes connections."""
        self._end(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL: nothing is saved."""
        self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, timeout_s: float) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10.0)

    def set_acl(self, acl: str) -> None:
        """Replace the ACL file's text; it takes effect at the next ``reload`` or start."""
        if self.acl is None:
            raise ValueError("this broker was started without an ACL (pass acl=...)")
        self.acl = acl
        self.acl_file.write_text(acl)

    def reload(self) -> None:
        """SIGHUP: Mosquitto reloads its password and ACL files; connections stay up."""
        if self._process is None:
            raise RuntimeError("broker not running")
        self._process.send_signal(signal.SIGHUP)

    def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same ports."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """What the broker has logged so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One message a recorder received."""

    topic: str
    payload: bytes
    retain: bool


class MqttRecorder:
    """A QoS 1 subscriber that records every message; by default a persistent session with a fixed client id.

    With ``clean_session=False`` the broker queues messages for it while it is disconnected (and, with
    broker persistence, across a broker restart). It reconnects by itself, quickly.
    """

    def __init__(
        self,
        url: str,
        topics: Sequence[str] = ("#",),
        *,
        client_id: str = "cabin-monitor-test-recorder",
        clean_session: bool = False,
    ) -> None:
        self._host, self._port, tls = parse_mqtt_url(url)
        if tls:
            raise ValueError(f"MqttRecorder speaks plain MQTT only; give it the broker's mqtt:// url, not {url}")
        self._topics = list(topics)
        self._messages: list[RecordedMessage] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=mqtt.MQTTv311
        )
        self._client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # paho takes floats
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        client.subscribe([(t, 1) for t in self._topics])

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: object, props: object) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            self._messages.append(RecordedMessage(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._changed.notify_all()

    def start(self, timeout_s: float = 10.0) -> MqttRecorder:
        """Connect and wait (bounded) until the subscription is acknowledged."""
        self._client.connect(self._host, self._port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"recorder could not subscribe to {self._topics} within {timeout_s} s")
        return self

    def stop(self) -> None:
        """Disconnect; a persistent session stays on the broker."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    @property
    def messages(self) -> list[RecordedMessage]:
        """A snapshot of everything received so far, in arrival order."""
        with self._changed:
            return list(self._messages)

    def wait_for(
        self, predicate: Callable[[list[RecordedMessage]], bool], timeout_s: float = 10.0
    ) -> list[RecordedMessage]:
        """Wait until ``predicate(messages)`` holds and return the messages; ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(list(self._messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(f"  {m.topic} retain={m.retain} {m.payload[:120]!r}" for m in self._messages[-10:])
                    raise TimeoutError(f"condition not met within {timeout_s} s; last messages:\n{tail}")
                self._changed.wait(min(left, 0.5))
            return list(self._messages)

    def __enter__(self) -> MqttRecorder:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
