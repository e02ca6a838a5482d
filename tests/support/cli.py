"""The command line run as a user runs it, in its own process, optionally with some packages missing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable

# A module set to None in sys.modules is one that cannot be imported, and that importlib.util.find_spec
# reports missing: the environment of an install without that extra.
WITHOUT = """
import sys
sys.modules.update(dict.fromkeys(filter(None, sys.argv[1].split(","))))
from cabin_monitor.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_cli(*args: str, without: Iterable[str] = (), timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """``cabin-monitor ARGS`` in a fresh interpreter where the top-level packages ``without`` are missing."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, ",".join(without), *args], capture_output=True, text=True, timeout=timeout_s
    )
