"""The example fleet broker in deploy/mosquitto: the repo's config and ACL, verbatim, on a real Mosquitto.

Only the machine-specific lines of mosquitto.conf (port, certificate and ACL paths, persistence folder,
log destination) are replaced; every client logs in with a certificate whose CN is its account.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from cabin_monitor.assets import sample_path
from tests.support.broker import MosquittoBroker
from tests.support.daemon import DaemonProcess, clean_environment
from tests.support.pki import TestPki, make_test_pki

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
OPERATOR = "fleet-operator"
# A window for a forbidden message to show up; only used after a later, allowed message has arrived.
WAIT_S = 10.0


# -- certificates and broker -------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCert:
    """A client certificate and its key."""

    cert: Path
    key: Path


def issue_client_cert(pki: TestPki, common_name: str) -> ClientCert:
    """A client certificate with this CN, signed by the CA of ``pki`` (the ``openssl`` command)."""
    directory = pki.ca_file.parent
    ext = directory / "fleet-client.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    key, csr, cert = (directory / f"{common_name}.{suffix}" for suffix in ("key", "csr", "crt"))
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sign = ["-CA", str(pki.ca_file), "-CAkey", str(directory / "ca.key"), "-CAcreateserial", "-days", "2"]
    for args in (
        ["req", *new_key, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}"],
        ["x509", "-req", "-in", str(csr), *sign, "-out", str(cert), "-extfile", str(ext)],
    ):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)
    return ClientCert(cert, key)


@dataclass(frozen=True)
class Fleet:
    """The fleet CA, a stranger's CA, and the certificates issued by each."""

    pki: TestPki
    certs: dict[str, ClientCert]
    rogue_certs: dict[str, ClientCert]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Certificates for car-1, car-2 and the operator from the fleet CA, and an 'operator' from another CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates: apt-get install -y openssl")
    pki = make_test_pki(tmp_path_factory.mktemp("fleet-pki"), common_name="fleet test CA")
    rogue = make_test_pki(tmp_path_factory.mktemp("rogue-pki"), common_name="rogue CA")
    return Fleet(
        pki=pki,
        certs={name: issue_client_cert(pki, name) for name in ("car-1", "car-2", OPERATOR)},
        rogue_certs={OPERATOR: issue_client_cert(rogue, OPERATOR)},
    )


def directives(text: str) -> list[tuple[str, str]]:
    """(keyword, rest of line) of every non-comment line of a mosquitto.conf."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword, rest.strip()))
    return out


def deploy_config(pki: TestPki, port: int, directory: Path) -> str:
    """deploy/mosquitto/mosquitto.conf with its machine-specific lines pointed at this test's files."""
    replace = {
        "listener": f"{port} 127.0.0.1",
        "cafile": str(pki.ca_file),
        "certfile": str(pki.server_cert),
        "keyfile": str(pki.server_key),
        "acl_file": str(DEPLOY_DIR / "acl"),  # the repo's ACL, verbatim
        "persistence_location": f"{directory}/",
        "log_dest": "stderr",
    }
    lines, replaced = [], set()
    for keyword, rest in directives((DEPLOY_DIR / "mosquitto.conf").read_text(encoding="utf-8")):
        if keyword in replace:
            rest = replace[keyword]
            replaced.add(keyword)
        lines.append(f"{keyword} {rest}")
    assert replaced == set(replace), f"mosquitto.conf lacks {set(replace) - replaced}"
    # Mosquitto started as root drops to the 'mosquitto' user, which could not read the test folders.
    lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    lines.append("log_type debug")  # "Denied PUBLISH" lines
    return "\n".join(lines) + "\n"


class FleetBroker(MosquittoBroker):
    """A Mosquitto running the repo's fleet config on a free port (its only listener, TLS)."""

    def __init__(self, directory: Path, pki: TestPki) -> None:
        super().__init__(directory)
        self.fleet_pki = pki

    def _write_config(self) -> None:
        self.config_file.write_text(deploy_config(self.fleet_pki, self.port, self.directory))


@pytest.fixture
def broker(tmp_path: Path, fleet: Fleet) -> Iterator[FleetBroker]:
    """The fleet broker, started for one test."""
    running = FleetBroker(tmp_path / "broker", fleet.pki)
    with running:
        yield running


# -- clients --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One message a client received."""

    topic: str
    payload: bytes


class FleetClient:
    """A paho MQTT 3.1.1 client (as the daemon speaks) logged in with a client certificate; records messages."""

    def __init__(self, broker: FleetBroker, ca_file: Path, cert: ClientCert | None, client_id: str) -> None:
        self._port = broker.port
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self._client.tls_set(
            ca_certs=str(ca_file),
            certfile=None if cert is None else str(cert.cert),
            keyfile=None if cert is None else str(cert.key),
        )
        self._messages: list[Received] = []
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if not getattr(rc, "is_failure", True):
            self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            self._messages.append(Received(msg.topic, bytes(msg.payload)))
            self._changed.notify_all()

    def will(self, topic: str, payload: bytes) -> FleetClient:
        """Set a retained last will (before ``connect``); the broker checks it against the ACL."""
        self._client.will_set(topic, payload, qos=1, retain=True)
        return self

    def connect(self, timeout_s: float = 10.0) -> FleetClient:
        """Connect and wait (bounded) for a successful CONNACK."""
        self._client.connect("127.0.0.1", self._port, keepalive=10)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise TimeoutError(f"no successful CONNACK within {timeout_s} s")
        return self

    def subscribe(self, *topics: str) -> None:
        """Subscribe at QoS 1 and wait (bounded) for the SUBACK."""
        acked = threading.Event()
        self._client.on_subscribe = lambda *_args: acked.set()
        result, _mid = self._client.subscribe([(t, 1) for t in topics])
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert acked.wait(10.0), f"no SUBACK for {topics}"

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait (bounded) for the PUBACK: by then the broker has routed the message."""
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(10.0)
        assert info.is_published(), f"no PUBACK for {topic}"

    def wait(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = WAIT_S, what: str = "condition"
    ) -> list[Received]:
        """Wait (bounded) until ``predicate(messages)`` holds; everything received so far, in order."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(list(self._messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} not reached within {timeout_s} s; received: {self._messages}")
                self._changed.wait(min(left, 0.5))
            return list(self._messages)

    def wait_for(self, topic: str, payload: bytes, timeout_s: float = WAIT_S) -> list[Received]:
        """Wait (bounded) until ``payload`` has arrived on ``topic``; everything received so far, in order."""
        return self.wait(lambda ms: Received(topic, payload) in ms, timeout_s, f"{topic} {payload!r}")

    def crash(self) -> None:
        """Drop the connection without a DISCONNECT, as a crashed or powered-off vehicle does."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def connect(broker: FleetBroker, fleet: Fleet) -> Iterator[Callable[[str], FleetClient]]:
    """Connects a client as the named account of the fleet CA; all are closed at the end."""
    clients: list[FleetClient] = []

    def make(account: str) -> FleetClient:
        client = FleetClient(broker, fleet.pki.ca_file, fleet.certs[account], f"{account}-{len(clients)}")
        clients.append(client)
        return client.connect()

    yield make
    for client in clients:
        client.close()


def connection_refused(
    broker: FleetBroker, ca_file: Path, cert: ClientCert | None, client_id: str, timeout_s: float = 10.0
) -> str:
    """Why a TLS + MQTT login fails (an empty string if it succeeds), without paho's automatic reconnects."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.tls_set(
        ca_certs=str(ca_file),
        certfile=None if cert is None else str(cert.cert),
        keyfile=None if cert is None else str(cert.key),
    )
    outcome: list[str] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: outcome.append("" if not rc.is_failure else f"CONNACK {rc}")
    try:
        client.connect("127.0.0.1", broker.port, keepalive=10)
        deadline = time.monotonic() + timeout_s
        while not outcome and time.monotonic() < deadline:
            rc = client.loop(timeout=0.2)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                outcome.append(f"connection lost ({mqtt.error_string(rc)})")
    except (ssl.SSLError, OSError) as exc:
        outcome.append(f"TLS: {exc}")
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
    assert outcome, f"neither accepted nor refused within {timeout_s} s"
    return outcome[0]


def denied_publishes(broker: FleetBroker) -> list[str]:
    """Topics of the publishes the broker refused (its debug log), in order."""
    return [line.split("'")[1] for line in broker.log_text().splitlines() if "Denied PUBLISH" in line and "'" in line]


# -- the tests ------------------------------------------------------------------------------------


def test_config_requires_client_certificates_and_the_acl() -> None:
    """mosquitto.conf: one TLS listener on 8883, client certificates as accounts, no anonymous access, persistence."""
    lines = directives((DEPLOY_DIR / "mosquitto.conf").read_text(encoding="utf-8"))
    assert [rest for keyword, rest in lines if keyword == "listener"] == ["8883"]
    assert "password_file" not in (keyword for keyword, _ in lines)
    conf = dict(lines)
    assert conf["require_certificate"] == "true"
    assert conf["use_identity_as_username"] == "true"
    assert conf["allow_anonymous"] == "false"
    assert conf["acl_file"] == "/etc/mosquitto/acl"
    assert conf["persistence"] == "true"
    assert all(conf[k].startswith("/etc/mosquitto/certs/") for k in ("cafile", "certfile", "keyfile"))


def test_vehicle_publishes_under_its_own_prefix_only(
    broker: FleetBroker, connect: Callable[[str], FleetClient]
) -> None:
    """car-1's events reach the operator; its publish to car-2's topic is dropped."""
    operator = connect(OPERATOR)
    operator.subscribe("cabin/#")
    car1 = connect("car-1")
    car1.publish("cabin/car-1/events", b"event-1")
    operator.wait_for("cabin/car-1/events", b"event-1")

    car1.publish("cabin/car-2/events", b"forged")  # forbidden
    car1.publish("cabin/car-1/events", b"event-2")  # allowed, same connection, so routed after the forged one
    got = operator.wait_for("cabin/car-1/events", b"event-2")
    assert [m.topic for m in got] == ["cabin/car-1/events", "cabin/car-1/events"]
    assert denied_publishes(broker) == ["cabin/car-2/events"]


def test_only_the_operator_sets_a_vehicles_config(broker: FleetBroker, connect: Callable[[str], FleetClient]) -> None:
    """car-1 cannot write its own config/set; the operator can, and car-1 receives it."""
    operator = connect(OPERATOR)
    operator.subscribe("cabin/#")
    car1 = connect("car-1")
    car1.subscribe("cabin/car-1/config/set")

    car1.publish("cabin/car-1/config/set", b'{"rules": {"stress": {"enabled": false}}}')  # forbidden
    car1.publish("cabin/car-1/events", b"after-forgery")
    operator.wait_for("cabin/car-1/events", b"after-forgery")
    # The broker had routed the forgery before its PUBACK, so before the operator's message below.
    operator.publish("cabin/car-1/config/set", b'{"request_id": "r1"}')
    assert car1.wait_for("cabin/car-1/config/set", b'{"request_id": "r1"}') == [
        Received("cabin/car-1/config/set", b'{"request_id": "r1"}')
    ]
    seen_by_operator = operator.wait_for("cabin/car-1/config/set", b'{"request_id": "r1"}')
    assert [m.payload for m in seen_by_operator if m.topic.endswith("/config/set")] == [b'{"request_id": "r1"}']
    assert denied_publishes(broker) == ["cabin/car-1/config/set"]


def test_only_the_operator_reads_and_resets_a_vehicles_rules(
    broker: FleetBroker, connect: Callable[[str], FleetClient]
) -> None:
    """car-1 cannot write its own config/get or config/reset (the operator can), and writes only its rules/state."""
    operator = connect(OPERATOR)
    operator.subscribe("cabin/#")
    car1 = connect("car-1")
    car1.subscribe("cabin/car-1/config/get", "cabin/car-1/config/reset")

    car1.publish("cabin/car-1/config/get", b"forged get")  # forbidden
    car1.publish("cabin/car-1/config/reset", b"forged reset")  # forbidden
    car1.publish("cabin/car-2/rules/state", b"forged state")  # forbidden
    car1.publish("cabin/car-1/rules/state", b"state")  # allowed, routed after the forgeries
    operator.wait_for("cabin/car-1/rules/state", b"state")
    operator.publish("cabin/car-1/config/get", b"get")
    operator.publish("cabin/car-1/config/reset", b"reset")
    got = car1.wait_for("cabin/car-1/config/reset", b"reset")
    assert got == [Received("cabin/car-1/config/get", b"get"), Received("cabin/car-1/config/reset", b"reset")]
    assert denied_publishes(broker) == ["cabin/car-1/config/get", "cabin/car-1/config/reset", "cabin/car-2/rules/state"]
    assert not any(m.topic.startswith("cabin/car-2/") for m in operator.wait_for("cabin/car-1/config/reset", b"reset"))


def test_vehicle_reads_nothing_of_other_vehicles(connect: Callable[[str], FleetClient]) -> None:
    """car-1 subscribed to cabin/# gets its own config/set only, not car-2's events or config."""
    car1 = connect("car-1")
    car1.subscribe("cabin/#")
    car2 = connect("car-2")
    operator = connect(OPERATOR)
    car2.publish("cabin/car-2/events", b"car-2 event")
    operator.publish("cabin/car-2/config/set", b"for car-2")
    operator.publish("cabin/car-1/config/set", b"for car-1")
    assert car1.wait_for("cabin/car-1/config/set", b"for car-1") == [Received("cabin/car-1/config/set", b"for car-1")]


def test_vehicle_may_leave_a_last_will_on_its_status(broker: FleetBroker, fleet: Fleet) -> None:
    """The daemon's retained 'offline' will on cabin/<id>/status is accepted at login and delivered."""
    operator = FleetClient(broker, fleet.pki.ca_file, fleet.certs[OPERATOR], "operator-will").connect()
    car1 = FleetClient(broker, fleet.pki.ca_file, fleet.certs["car-1"], "car-1-will")
    try:
        operator.subscribe("cabin/car-1/status")
        car1.will("cabin/car-1/status", b"offline").connect()
        car1.publish("cabin/car-1/status", b"online")
        operator.wait_for("cabin/car-1/status", b"online")
        car1.crash()
        operator.wait_for("cabin/car-1/status", b"offline", timeout_s=30.0)
    finally:
        car1.close()
        operator.close()


def test_clients_without_a_fleet_certificate_are_refused(broker: FleetBroker, fleet: Fleet) -> None:
    """No client certificate, or one from another CA (even with the operator's CN), cannot log in."""
    ca_file = fleet.pki.ca_file
    assert connection_refused(broker, ca_file, fleet.certs["car-1"], "control") == ""  # the control: accepted
    assert connection_refused(broker, ca_file, None, "no-cert") != ""
    assert connection_refused(broker, ca_file, fleet.rogue_certs[OPERATOR], "rogue-ca") != ""
    log = broker.log_text()
    assert " as control " in log and " as no-cert " not in log and " as rogue-ca " not in log


def test_daemon_works_within_the_acl(
    broker: FleetBroker, fleet: Fleet, connect: Callable[[str], FleetClient], tmp_path: Path
) -> None:
    """The real daemon as car-1 over mutual TLS: status, health and config/result get through; exit 0 on SIGTERM."""
    operator = connect(OPERATOR)
    operator.subscribe("cabin/#")
    cert = fleet.certs["car-1"]
    cfg = {
        "vehicle_id": "car-1",
        "state_dir": str(tmp_path / "state"),
        "mqtt": {
            "url": f"mqtts://127.0.0.1:{broker.port}",
            "tls": {"ca_file": str(fleet.pki.ca_file), "cert_file": str(cert.cert), "key_file": str(cert.key)},
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
            "health_interval_s": 1.0,
        },
        "logging": {"format": "json"},
    }
    config = tmp_path / "cabin-monitor.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = clean_environment()
    clip = sample_path("single_face.mp4")
    daemon = DaemonProcess(tmp_path, ["--config", str(config), "--source", str(clip), "--loop"], env=env)
    try:
        operator.wait_for("cabin/car-1/status", b"online", timeout_s=120.0)
        operator.wait(lambda ms: any(m.topic == "cabin/car-1/health" for m in ms), 30.0, "a health message")
        operator.publish("cabin/car-1/config/set", json.dumps({"request_id": "acl-1", "rules": {}}).encode())
        got = operator.wait(lambda ms: any(m.topic == "cabin/car-1/config/result" for m in ms), 30.0, "config/result")
        results = [json.loads(m.payload) for m in got if m.topic == "cabin/car-1/config/result"]
        assert results[0]["request_id"] == "acl-1" and results[0]["ok"] is True
        operator.publish("cabin/car-1/config/get", json.dumps({"request_id": "acl-2"}).encode())
        got = operator.wait(lambda ms: len([m for m in ms if m.topic.endswith("/config/result")]) == 2, 30.0, "get")
        answers = [json.loads(m.payload) for m in got if m.topic == "cabin/car-1/config/result"]
        assert (answers[1]["action"], answers[1]["request_id"], answers[1]["ok"]) == ("get", "acl-2", True)
        states = [json.loads(m.payload) for m in got if m.topic == "cabin/car-1/rules/state"]
        assert [s["cause"] for s in states][-1] == "config/set" and states[-1]["request_id"] == "acl-1"
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.logs()[-3000:]
        operator.wait_for("cabin/car-1/status", b"offline")
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
    assert denied_publishes(broker) == []
