"""deploy/install.sh: one real install into a scratch root, checked the way an image build and first boot use it.

The install (a venv with cabin-monitor[cpu] and its dependencies from the configured package index or pip
cache, about a minute) runs once for the module. Its venv is built for /opt/cabin-monitor/venv, so the
installed command is run either at that path inside a private mount namespace, or through the venv's
interpreter where namespaces are not allowed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "install.sh"
VENV = "/opt/cabin-monitor/venv"
UNIT = "usr/lib/systemd/system/cabin-monitor.service"
SYSUSERS = "usr/lib/sysusers.d/cabin-monitor.conf"
TMPFILES = "usr/lib/tmpfiles.d/cabin-monitor.conf"
CONFIG = "etc/cabin-monitor/cabin-monitor.yaml"
BRIDGE = "etc/mosquitto/conf.d/cabin-fleet-bridge.conf"
BRIDGE_URL = "mqtts://fleet.example:8883"
INSTALL_TIMEOUT_S = 900.0  # dependency wheels from a cold pip cache on a busy 2-core machine


@dataclass(frozen=True)
class Installed:
    """A scratch root after ``install.sh --destdir ROOT --extra cpu --extras metrics --record``, and its output."""

    root: Path
    output: str

    @property
    def venv(self) -> Path:
        """The venv inside the root."""
        return self.root / VENV.lstrip("/")

    def site_packages(self) -> Path:
        """The venv's site-packages folder."""
        (path,) = self.venv.glob("lib/python3*/site-packages")
        return path


def script_env() -> dict[str, str]:
    """This environment, without a DESTDIR of its own, making the venv with this test run's Python."""
    env = {k: v for k, v in os.environ.items() if k != "DESTDIR"}
    env["PYTHON"] = sys.executable
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """One install from this checkout into a scratch root holding the venv of an earlier install."""
    root = tmp_path_factory.mktemp("image-root")
    earlier = root / VENV.lstrip("/")
    earlier.mkdir(parents=True)
    (earlier / "EARLIER").write_text("the venv an update replaces\n")
    # Under a strict umask, as on hardened build machines: the script must not depend on it.
    command = ["sh", "-c", 'umask 077 && exec "$@"', "sh", str(SCRIPT), "--destdir", str(root), "--extra", "cpu"]
    command += ["--extras", "metrics", "--record", "--bridge", BRIDGE_URL, "--vehicle-id", "car-17"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=script_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield Installed(root, proc.stdout + proc.stderr)
    shutil.rmtree(root, ignore_errors=True)  # about 800 MB; pytest would keep it for three runs


def mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return path.stat().st_mode & 0o7777


def mount_namespaces_work() -> bool:
    """Whether this process may bind-mount in a private mount namespace (root, not blocked by a sandbox)."""
    unshare = shutil.which("unshare")
    if unshare is None or not Path("/opt").is_dir():
        return False
    probe = subprocess.run([unshare, "-m", "mount", "--bind", "/opt", "/opt"], capture_output=True, timeout=30)
    return probe.returncode == 0


def at_final_path(root: Path, command: Sequence[str]) -> list[str]:
    """``command`` run with ``ROOT/opt`` mounted on /opt in a private mount namespace."""
    inner = 'mount --bind "$1/opt" /opt && shift && exec "$@"'
    return ["unshare", "-m", "sh", "-c", inner, "sh", str(root), *command]


# -- the layout ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_install_lays_out_unit_user_folders_and_config(installed: Installed) -> None:
    """Unit, sysusers.d and tmpfiles.d files as in the repo (0644); the example config 0640 in a 0750 folder."""
    root = installed.root
    for installed_path, repo_path in (
        (UNIT, "systemd/cabin-monitor.service"),
        (SYSUSERS, "deploy/sysusers.d/cabin-monitor.conf"),
        (TMPFILES, "deploy/tmpfiles.d/cabin-monitor.conf"),
    ):
        assert (root / installed_path).read_bytes() == (REPO / repo_path).read_bytes()
        assert mode(root / installed_path) == 0o644, installed_path
    assert (root / CONFIG).read_bytes() == (REPO / "deploy" / "cabin-monitor.example.yaml").read_bytes()
    assert mode(root / CONFIG) == 0o640
    assert mode((root / CONFIG).parent) == 0o750
    # Readable by the daemon's user, whatever the umask of whoever installed.
    assert mode(installed.venv / "bin" / "cabin-monitor") == 0o755
    assert mode(installed.site_packages() / "cabin_monitor" / "cli.py") == 0o644
    assert (installed.site_packages() / "pyarrow").is_dir()  # --record: what record.dir needs
    assert (installed.site_packages() / "prometheus_client").is_dir()  # --extras metrics: metrics.enabled's
    assert "cabin-monitor[cpu,metrics,record]" in installed.output
    # Nothing that first boot makes (user, state and cache folders), no enabled unit, nothing run on this machine.
    assert not (root / "var").exists() and not (root / "etc" / "passwd").exists()
    assert not (root / "etc" / "systemd").exists()
    assert "running systemd-sysusers" not in installed.output and "daemon-reload" not in installed.output
    assert f"systemctl --root={root} enable cabin-monitor.service" in installed.output


@pytest.mark.slow
def test_bridge_to_the_fleet_broker_is_rendered_for_the_vehicle(installed: Installed) -> None:
    """--bridge writes the bridge for car-17 (0644): its own topics out, its config requests in, its certificate."""
    text = (installed.root / BRIDGE).read_text()
    assert mode(installed.root / BRIDGE) == 0o644
    assert "address fleet.example:8883\n" in text and "remote_clientid car-17\n" in text
    assert "topic cabin/car-17/events out 1\n" in text and "topic cabin/car-17/config/set in 1\n" in text
    assert "bridge_certfile /etc/mosquitto/certs/car-17.crt\n" in text and "@" not in text
    assert "cleansession false\n" in text and "bridge_protocol_version mqttv50\n" in text


@pytest.mark.slow
def test_update_keeps_the_replaced_venv_and_leaves_no_build_folder(installed: Installed) -> None:
    """The venv that was there becomes venv.previous (for a roll-back); no venv.new is left behind."""
    assert (installed.root / (VENV.lstrip("/") + ".previous") / "EARLIER").is_file()
    assert not (installed.venv / "EARLIER").exists()
    assert not installed.venv.with_name("venv.new").exists()


@pytest.mark.slow
def test_venv_names_only_its_final_path(installed: Installed) -> None:
    """Scripts start with #!/opt/cabin-monitor/venv/bin/python; no file, byte code included, names the scratch root."""
    shebang = (installed.venv / "bin" / "cabin-monitor").read_text().splitlines()[0]
    assert shebang == f"#!{VENV}/bin/python"
    commands = [line for line in (installed.venv / "pyvenv.cfg").read_text().splitlines() if line.startswith("command")]
    assert all(line.endswith(f" -m venv {VENV}") for line in commands), commands  # Python >= 3.11 writes one
    scratch = str(installed.root).encode()
    naming = [p for p in installed.venv.rglob("*") if p.is_file() and not p.is_symlink() and scratch in p.read_bytes()]
    assert naming == []
    compiled = list((installed.site_packages() / "cabin_monitor" / "__pycache__").glob("cli.*.pyc"))
    assert compiled, "the package has no byte code: /opt is read-only for the daemon"


@pytest.mark.slow
def test_no_test_helper_is_installed(installed: Installed) -> None:
    """The wheel carries the daemon only: no tests package, no cabin_monitor.testing, no test helpers."""
    site = installed.site_packages()
    assert not (site / "tests").exists()
    assert not (site / "cabin_monitor" / "testing.py").exists()
    assert not (site / "helpers.py").exists()
    (record,) = site.glob("cabin_monitor-*.dist-info/RECORD")
    files = [line.split(",")[0] for line in record.read_text().splitlines()]
    assert [f for f in files if f.startswith("tests/") or "testing" in f or "helpers" in f] == []
    assert "cabin_monitor/cli.py" in files


# -- the installed command -----------------------------------------------------------------------------


@pytest.mark.slow
def test_installed_command_checks_the_installed_config(installed: Installed) -> None:
    """The venv's cabin-monitor (run by the venv's interpreter) prints its help and accepts the installed config."""
    command = [str(installed.venv / "bin" / "python"), str(installed.venv / "bin" / "cabin-monitor")]
    help_text = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=True)
    assert "check-config" in help_text.stdout
    proc = subprocess.run(
        [*command, "check-config", str(installed.root / CONFIG)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": OK (vehicle demo-vehicle" in proc.stdout


@pytest.mark.slow
def test_installed_command_runs_the_model_at_its_final_path(installed: Installed) -> None:
    """/opt/cabin-monitor/venv/bin/cabin-monitor, through its own #! line, runs the bundled model from the venv."""
    if not mount_namespaces_work():
        pytest.skip("no private mount namespace here (needs root and unshare); the venv is only checked in place")
    command = [f"{VENV}/bin/cabin-monitor", "bench", "--model-only", "--runs", "3", "--json"]
    proc = subprocess.run(at_final_path(installed.root, command), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == f"{VENV}/share/cabin-monitor/models/emotionaldan-7.onnx"
    assert report["provider"] == "CPUExecutionProvider"
    assert set(report["batches"]) == {"1", "2", "4"}


# -- systemd -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_the_installed_unit(installed: Installed, tmp_path: Path) -> None:
    """``systemd-analyze verify`` passes on the installed unit (ExecStart: the installed command), warning-free."""
    if mount_namespaces_work():
        unit = installed.root / UNIT
        command = at_final_path(installed.root, ["systemd-analyze", "verify", str(unit)])
    else:  # verify checks that ExecStart exists: point it at the venv in the scratch root
        text, count = re.subn(
            rf"(?m)^ExecStart={re.escape(VENV)}/", f"ExecStart={installed.venv}/", (installed.root / UNIT).read_text()
        )
        assert count == 1, "ExecStart does not run the installed venv's command"
        unit = tmp_path / "cabin-monitor.service"
        unit.write_text(text)
        command = ["systemd-analyze", "verify", str(unit)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert [line for line in output.splitlines() if unit.name in line or "ignoring" in line.lower()] == [], output


@pytest.mark.slow
def test_first_boot_creates_the_user_and_folders(installed: Installed, tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles --create on the installed files: the user in video, owners, modes."""
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers/systemd-tmpfiles are not installed here")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to give the folders their owner")
    root = tmp_path / "first-boot"  # a copy: the module's root stays as the install left it
    for relative in (SYSUSERS, TMPFILES, CONFIG):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(installed.root / relative, root / relative)
    for command in ([sysusers, f"--root={root}"], [tmpfiles, f"--root={root}", "--create"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "group").read_text().splitlines()}
    user = users["cabin-monitor"]
    uid, gid = int(user[2]), int(user[3])
    assert user[5] == "/var/lib/cabin-monitor" and 0 < uid < 1000
    assert int(groups["cabin-monitor"][2]) == gid
    assert "cabin-monitor" in groups["video"][3].split(",")

    def owner(relative: str) -> tuple[int, int, int]:
        st = (root / relative).stat()
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    assert owner("etc/cabin-monitor") == (0, gid, 0o750)
    assert owner(CONFIG) == (0, gid, 0o640)
    assert owner("var/lib/cabin-monitor") == (uid, gid, 0o750)  # the unit's StateDirectoryMode
    assert owner("var/cache/cabin-monitor") == (uid, gid, 0o750)  # the unit's CacheDirectoryMode


# -- the script itself (fast) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--frobnicate"], "unknown argument: --frobnicate"),
        (["--extra", "tpu"], "--extra must be cpu or gpu, not 'tpu'"),
        (["--extra"], "--extra needs a value"),
        (["--extras", "metrics,gpu"], "--extras: give the onnxruntime build with --extra gpu"),
        (["--extras", "metrics,*"], "--extras: not an extra name: '*'"),
        (["--wheel", "cabin_monitor-0.1.0-py3-none-any.whl", "--source", "."], "not both"),
        (["--wheel", "missing/cabin_monitor-0.1.0-py3-none-any.whl"], "no such wheel"),
        (["--wheel", "pyproject.toml"], "--wheel wants a .whl file"),
        (["--source", "/nonexistent"], "not a cabin-monitor source tree"),
    ],
)
def test_install_script_refuses_bad_arguments(arguments: list[str], message: str, tmp_path: Path) -> None:
    """A bad argument ends with exit code 2 and one line naming it, before anything is installed."""
    root = tmp_path / "root"
    proc = subprocess.run(
        [str(SCRIPT), "--destdir", str(root), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=script_env(),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("install.sh: ") and message in proc.stderr, proc.stderr
    assert not (root / "opt").exists()


def test_install_script_help() -> None:
    """--help prints the usage and exits 0."""
    proc = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, env=script_env())
    assert proc.returncode == 0 and proc.stdout.startswith("usage: deploy/install.sh [--destdir DIR]")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed here")
def test_install_script_passes_shellcheck() -> None:
    """shellcheck finds nothing in deploy/install.sh."""
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
