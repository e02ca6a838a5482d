"""A Dask cluster of separate processes for tests: ``dask scheduler`` and ``dask worker`` commands, as deployed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).with_name("dask")
START_TIMEOUT_S = 60.0


@contextlib.contextmanager
def dask_cluster(folder: Path, workers: int) -> Iterator[str]:
    """A scheduler on a free port and ``workers`` single-threaded workers; yields the scheduler's address."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    scheduler_file = folder / "scheduler.json"
    common = ["--no-dashboard"]
    processes = [
        subprocess.Popen(
            [str(DASK), "scheduler", "--port", "0", "--scheduler-file", str(scheduler_file), *common],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(folder / "scheduler.log").open("w"),
        )
    ]
    try:
        address = _wait_for_address(scheduler_file, processes[0])
        processes += [
            subprocess.Popen(
                [str(DASK), "worker", address, "--nthreads", "1", "--no-nanny", *common],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=(folder / f"worker-{n}.log").open("w"),
            )
            for n in range(workers)
        ]
        _wait_for_workers(address, workers)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_address(scheduler_file: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {process.returncode}")
        try:
            return str(json.loads(scheduler_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    raise RuntimeError("dask scheduler did not start in time")


def _wait_for_workers(address: str, workers: int) -> None:
    from distributed import Client

    with Client(address, timeout=START_TIMEOUT_S) as client:
        client.wait_for_workers(workers, timeout=START_TIMEOUT_S)
