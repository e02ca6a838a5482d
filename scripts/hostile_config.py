"""Hostile configurations: how long loading each takes and how much memory it costs, and what
``check-config`` and ``run`` answer.

    python scripts/hostile_config.py [--cli]

Each case is loaded in a fresh process (``load_config``): the time it takes and its peak resident memory
above the process's size before it (VmHWM after, VmRSS before). ``--cli`` also runs ``check-config`` and ``run`` on
each, and prints their exit codes and the number of stderr lines. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from cabin_monitor.config.loader import MAX_CONFIG_BYTES

MEASURE = """
import json, sys, time
from pathlib import Path
from cabin_monitor.config import ConfigError, load_config

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

before_kb = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current size
start = time.perf_counter()
try:
    load_config(Path(sys.argv[1]))
    answer = "loaded"
except ConfigError as exc:
    answer = exc.problems[0][:90]
elapsed_s = time.perf_counter() - start
peak_kb = status_kb("VmHWM")
print(json.dumps({"s": elapsed_s, "mb": (peak_kb - before_kb) / 1024, "answer": answer}))
"""


def alias_bomb(levels: int, fan_out: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan_out)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"tracker: {{seats: *a{levels}}}"]) + "\n"


def fill(unit: Callable[[int], str], head: str = "", tail: str = "") -> str:
    """``head``, then ``unit(i)`` for i = 0, 1, ... while it fits the size limit, then ``tail``."""
    parts, size, i = [head], len(head) + len(tail), 0
    while size + len(piece := unit(i)) <= MAX_CONFIG_BYTES:
        parts.append(piece)
        size += len(piece)
        i += 1
    return "".join([*parts, tail])


CASES: dict[str, Callable[[], str]] = {
    "alias bomb, 24 aliases (12 levels of 2)": lambda: alias_bomb(12, 2),
    "alias bomb, 63 aliases (7 levels of 9)": lambda: alias_bomb(7, 9),
    "5,000 nested [": lambda: "camera: " + "[" * 5000 + "\n",
    "size limit of one plain scalar": lambda: fill(lambda i: "x", "vehicle_id: "),
    "size limit of one quoted scalar": lambda: fill(lambda i: "x", 'vehicle_id: "', '"\n'),
    "size limit of a comment": lambda: fill(lambda i: "x", "# ", "\n"),
    "size limit of top-level keys": lambda: fill(lambda i: f"k{i}: 1\n"),
    "size limit of a flow list": lambda: fill(lambda i: "1,", "camera: {source: [", "]}\n"),
    "size limit of 64 aliases to a big list": lambda: (
        "a: &a [" + ",".join(["1"] * 300) + "]\nb: [" + ",".join(["*a"] * 64) + "]\n"
    ),
}


def measure(path: Path) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        return {"s": float("nan"), "mb": float("nan"), "answer": proc.stderr.strip().splitlines()[-1][:90]}
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def cli(path: Path, command: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CABIN_MONITOR")}
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", *command, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    return f"exit {proc.returncode}, {len(proc.stderr.strip().splitlines())} line(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cli", action="store_true", help="also run check-config and run on each case")
    args = parser.parse_args()
    print("| case | bytes | load time | peak memory above the start | answer |" + (" check-config | run |" * args.cli))
    print("| --- | --- | --- | --- | --- |" + (" --- | --- |" * args.cli))
    with tempfile.TemporaryDirectory() as folder:
        for name, make in CASES.items():
            path = Path(folder) / "cabin-monitor.yaml"
            path.write_text(make())
            m = measure(path)
            row = f"| {name} | {path.stat().st_size:,} | {m['s']:.3f} s | {m['mb']:.1f} MB | {m['answer']} |"
            if args.cli:
                row += f" {cli(path, ['check-config'])} | {cli(path, ['run', '--config'])} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
