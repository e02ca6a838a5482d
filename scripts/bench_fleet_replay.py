"""Fleet what-if throughput: recording-hours replayed per second per worker, in-process and on local Dask workers.

A simulated fleet is built from a real recording: each vehicle-day is the recorded clip tiled to
``--hours-per-day``, shifted to its own day and time, its probabilities jittered (up to 0.1 %) and each
vehicle's negative classes scaled by its own factor (0.8 to 1.2), so that vehicles differ in alert rate.
The fleet is replayed in-process, then on a local cluster of ``--workers`` processes (its start timed
apart), the summaries compared, and a sweep of ``--sweep-values`` values timed against a single replay.

    cabin-monitor demo --fast --record /tmp/rec            # one occupant, the bundled clip
    python scripts/bench_fleet_replay.py /tmp/rec --vehicles 8 --days 2 --hours-per-day 0.25 --out /tmp/fleet
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cabin_monitor.fleet.whatif import cluster_client, replay_with
from cabin_monitor.record.files import Session, expand, open_file, session_items, sessions
from cabin_monitor.record.format import FrameSample, RecordingMeta, RowBuffer
from cabin_monitor.record.replay import RulesChoice, Summary
from cabin_monitor.record.whatif import fold, replay_unit

NEGATIVE = {"sadness", "fear", "disgust", "anger"}
DAY_S = 86400.0


def main() -> None:
    """Build the fleet, replay it in-process and on Dask, sweep; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording", help="a recording folder or file (one session)")
    parser.add_argument("--vehicles", type=int, default=8)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--hours-per-day", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sweep-values", type=int, default=5)
    parser.add_argument("--out", required=True, help="empty folder for the simulated fleet")
    args = parser.parse_args()

    out = Path(args.out)
    started = time.perf_counter()
    files = build_fleet(Path(args.recording), out, args.vehicles, args.days, args.hours_per_day)
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"fleet: {len(files)} vehicle-days ({size_mb:.1f} MB) built in {time.perf_counter() - started:.1f} s")
    found = sessions([open_file(p) for p in expand([str(out)])])
    one = [RulesChoice()]

    started, cpu = time.perf_counter(), time.process_time()
    local = fold(o[0].summary for o in (replay_unit(s, one) for s in found))
    report("in-process", local, time.perf_counter() - started, 1, time.process_time() - cpu)

    started = time.perf_counter()
    with cluster_client(None, args.workers) as client:
        client.run(_warm_up)  # each worker imports the replay code before the clock starts
        print(f"local cluster of {args.workers} worker processes started in {time.perf_counter() - started:.1f} s")
        started, cpu = time.perf_counter(), client.run(time.process_time)
        spread = fold(o[0].summary for o in replay_with(client, found, one))
        elapsed = time.perf_counter() - started
        cpu_s = sum(client.run(time.process_time).values()) - sum(cpu.values())
        report(f"--workers {args.workers}", spread, elapsed, args.workers, cpu_s)
    print(f"summaries identical: {local.as_json() == spread.as_json()}")

    values = np.linspace(0.5, 0.95, args.sweep_values)
    sweep = [RulesChoice(patch={"stress": {"enter_score": round(float(v), 4)}}) for v in values]
    started, cpu = time.perf_counter(), time.process_time()
    for session in found:
        replay_unit(session, sweep)
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    hours = local.overall.seconds / 3600
    print(
        f"in-process sweep of {len(sweep)} enter_score values: {elapsed:.2f} s, {cpu_s:.1f} CPU-s, "
        f"{hours * len(sweep) / cpu_s:.2f} recording-hours x values per CPU-second"
    )


def report(label: str, summary: Summary, elapsed_s: float, workers: int, cpu_s: float) -> None:
    """One line: hours replayed, time, hours per second (per worker), and per CPU-second (on a shared machine
    the fairer figure)."""
    hours = summary.overall.seconds / 3600
    print(
        f"{label}: {hours:.2f} recording-hours ({summary.frames} frames, {summary.sessions} sessions) in "
        f"{elapsed_s:.2f} s: {hours / elapsed_s:.2f} recording-hours/s, {hours / elapsed_s / workers:.2f} per worker; "
        f"{cpu_s:.1f} CPU-s, {hours / cpu_s:.2f} recording-hours per CPU-second"
    )


def _warm_up() -> None:
    import cabin_monitor.record.whatif  # noqa: F401


def build_fleet(recording: Path, out: Path, vehicles: int, days: int, hours_per_day: float) -> list[Path]:
    """One file per vehicle-day under ``out/<vehicle>/``; their paths."""
    (source,) = sessions([open_file(p) for p in expand([str(recording)])])[:1]
    frames = [item for item in session_items(source) if isinstance(item, FrameSample)]
    step_s = frames[1].capture_s - frames[0].capture_s
    clip_s = frames[-1].capture_s - frames[0].capture_s + step_s
    copies = max(1, round(hours_per_day * 3600 / clip_s))
    written = []
    for v in range(vehicles):
        rng = random.Random(v)
        gain = rng.uniform(0.8, 1.2)
        for day in range(days):
            meta = _meta(source, f"car-{v:04d}", day)
            start_s = day * DAY_S + rng.uniform(6, 18) * 3600
            path = out / meta.vehicle_id / f"{meta.vehicle_id}-day{day:03d}.parquet"
            write_day(path, meta, frames, copies, clip_s, start_s, gain, rng)
            written.append(path)
    return written


def _meta(source: Session, vehicle_id: str, day: int) -> RecordingMeta:
    meta = source.files[0].meta
    return replace(meta, vehicle_id=vehicle_id, session_id=str(uuid.uuid4()), segment=0)


def write_day(
    path: Path,
    meta: RecordingMeta,
    frames: Sequence[FrameSample],
    copies: int,
    clip_s: float,
    start_s: float,
    gain: float,
    rng: random.Random,
) -> None:
    """The clip ``copies`` times from ``start_s`` on, perturbed, as one recording file."""
    negative = [name in NEGATIVE for name in meta.class_names]
    buffer = RowBuffer(meta.class_names)
    for n in range(copies):
        shift_s = start_s + n * clip_s
        for frame in frames:
            jitter_s = rng.uniform(-1e-3, 1e-3)
            buffer.add(
                replace(
                    frame,
                    frame_id=frame.frame_id + n * len(frames),
                    capture_s=frame.capture_s + shift_s + jitter_s,
                    wall_time_s=frame.wall_time_s + shift_s + jitter_s,
                    media_s=None,
                    occupants=tuple(
                        replace(o, raw=_perturb(o.raw, negative, gain, rng), smoothed=o.smoothed)
                        for o in frame.occupants
                    ),
                    events=(),
                )
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(buffer.table(meta), path, compression="zstd")


def _perturb(values: tuple[float, ...], negative: list[bool], gain: float, rng: random.Random) -> tuple[float, ...]:
    """Negative classes scaled by ``gain``, every value moved by up to 0.1 %, summed to one again (float32)."""
    moved = [v * (gain if neg else 1.0) * rng.uniform(0.999, 1.001) for v, neg in zip(values, negative, strict=True)]
    total = sum(moved)
    return tuple(float(np.float32(v / total)) for v in moved)


if __name__ == "__main__":
    main()
