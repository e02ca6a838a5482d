"""The daemon as a child process, as systemd runs it, with its output in files."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.helpers import exit_code


def clean_environment() -> dict[str, str]:
    """This process's environment without the daemon's own and systemd's variables, which would steer the child."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CABIN_MONITOR__", "NOTIFY_", "WATCHDOG_"))}


class DaemonProcess:
    """A ``python -m cabin_monitor run ARGS`` child process; stdout (events) and stderr (JSON logs) go to files."""

    def __init__(
        self,
        directory: Path,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> None:
        stamp = time.monotonic_ns()
        self.out_path = directory / f"stdout-{stamp}.log"
        self.err_path = directory / f"stderr-{stamp}.log"
        environment = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        command = [*command_prefix, sys.executable, "-m", "cabin_monitor", "run", *args]
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=environment)

    def wait(self, timeout_s: float = 60.0) -> int:
        """The exit code, waiting at most ``timeout_s`` (then the process is killed and AssertionError raised)."""
        return exit_code(self.proc, timeout_s, f"daemon did not exit within {timeout_s} s; stderr:", self.logs)

    def logs(self) -> str:
        """What the daemon logged so far."""
        return self.err_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far."""
        records = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        return records

    def logged(self, event: str) -> list[dict[str, Any]]:
        """Log records whose ``event`` is exactly this message."""
        return [r for r in self.log_records() if r.get("event") == event]

    def kill(self) -> None:
        """SIGKILL: no clean-up at all."""
        self.proc.kill()
        self.proc.wait(10)
