"""CPU time of this process and of each of its threads, read from ``/proc/self/task``.

The share a daemon takes of the onboard computer is CPU-seconds per wall second. Python's own
threads are named by their ``threading`` name; native threads (onnxruntime's pool, MediaPipe's
graph) by the kernel's thread name, so a pool that spins while idle shows up under its own name.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

TASKS = Path("/proc/self/task")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU-seconds used so far, in all and per thread name, at one moment."""

    wall_s: float
    process_s: float
    by_thread_s: dict[str, float]


def _thread_cpu_s(tid: str) -> float:
    """utime + stime of one thread, in seconds (0 when it has just ended)."""
    try:
        stat = (TASKS / tid / "stat").read_text()
    except OSError:
        return 0.0
    # The name field may hold spaces and brackets: the fields we need follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def _kernel_name(tid: str) -> str:
    try:
        return (TASKS / tid / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def sample() -> CpuSample:
    """The CPU time of the process and of each thread, grouped by thread name."""
    python_names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    main_id = threading.main_thread().native_id
    by_name: dict[str, float] = defaultdict(float)
    if TASKS.is_dir():
        for entry in TASKS.iterdir():
            tid = entry.name
            native = int(tid)
            if native in python_names:
                name = "main" if native == main_id else python_names[native]
            else:
                name = f"native:{_kernel_name(tid)}"
            by_name[name] += _thread_cpu_s(tid)
    times = os.times()
    return CpuSample(time.monotonic(), times.user + times.system, dict(by_name))


@dataclass(frozen=True, slots=True)
class CpuShare:
    """CPU-seconds per wall second over a span: in all, as a share of the machine's cores, and per thread."""

    cores_used: float
    share_of_machine: float
    by_thread: dict[str, float]  # largest first; threads that used nothing left out
    wall_s: float

    def as_dict(self) -> dict[str, object]:
        """The share as JSON-ready values, rounded."""
        return {
            "cores_used": round(self.cores_used, 3),
            "share_of_machine": round(self.share_of_machine, 3),
            "by_thread": {name: round(v, 3) for name, v in self.by_thread.items()},
            "wall_s": round(self.wall_s, 2),
        }


def share(start: CpuSample, end: CpuSample) -> CpuShare:
    """The CPU share between two samples. Threads that ended in between are counted in the total only."""
    wall_s = max(1e-9, end.wall_s - start.wall_s)
    per_thread = {name: (cpu_s - start.by_thread_s.get(name, 0.0)) / wall_s for name, cpu_s in end.by_thread_s.items()}
    ordered = dict(sorted(((k, v) for k, v in per_thread.items() if v > 0), key=lambda kv: -kv[1]))
    total = (end.process_s - start.process_s) / wall_s
    return CpuShare(total, total / len(os.sched_getaffinity(0)), ordered, wall_s)
