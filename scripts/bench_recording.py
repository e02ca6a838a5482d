"""How big an hour of recording is, and how fast it replays: a recorded clip tiled to an hour, written by the real
recorder (its thread, rotation and cap), then read back and replayed through the rules engine.

Each copy of the clip is jittered (probabilities by up to 0.1 %, times by up to 1 ms), so that no value repeats
and the compressor sees what an hour of a real camera gives it; the size is given per hour at 30 frames/s.

    cabin-monitor demo --fast --record /tmp/rec            # one occupant, the bundled clip
    python scripts/bench_recording.py /tmp/rec --hours 1 --out /tmp/rec-hour
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cabin_monitor.config import RecordConfig
from cabin_monitor.record.files import expand, open_file, session_items, sessions
from cabin_monitor.record.format import FrameSample
from cabin_monitor.record.replay import replay_session
from cabin_monitor.runtime.recorder import Recorder


def main() -> None:
    """Tile, write, measure, replay, measure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording", help="a recording folder or file (one session)")
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--out", required=True, help="empty folder for the tiled recording")
    args = parser.parse_args()

    source = sessions([open_file(p) for p in expand([args.recording])])[0]
    frames = [item for item in session_items(source) if isinstance(item, FrameSample)]
    clip_s = frames[-1].capture_s - frames[0].capture_s + (frames[1].capture_s - frames[0].capture_s)
    copies = max(1, round(args.hours * 3600 / clip_s))
    meta = source.files[0].meta
    out = Path(args.out)
    recorder = Recorder(RecordConfig(dir=out, max_file_age_s=86400), replace(meta, session_id=meta.session_id[::-1]))
    recorder.start()
    written = 0
    for n in range(copies):
        shift_s = n * clip_s
        for frame in frames:
            jitter_s = random.uniform(-1e-3, 1e-3)
            sample = replace(
                frame,
                frame_id=frame.frame_id + n * len(frames),
                capture_s=frame.capture_s + shift_s + jitter_s,
                wall_time_s=frame.wall_time_s + shift_s + jitter_s,
                media_s=None if frame.media_s is None else frame.media_s + shift_s,
                occupants=tuple(replace(o, raw=_jitter(o.raw), smoothed=_jitter(o.smoothed)) for o in frame.occupants),
                events=(),
            )
            while recorder._queue.full():  # a benchmark may wait; the daemon never does
                time.sleep(0.01)
            recorder._offer(sample)
            written += 1
    recorder.stop(600.0)
    files = sorted(out.glob("*.parquet"))
    total = sum(f.stat().st_size for f in files)
    hours = copies * clip_s / 3600
    print(
        f"{written} frames ({hours:.2f} h at {len(frames) / clip_s:.1f} fps, "
        f"{sum(len(f.occupants) for f in frames) / len(frames):.2f} occupants per frame): "
        f"{len(files)} files, {total / 1e6:.2f} MB; {total / written * 30 * 3600 / 1e6:.2f} MB per hour at 30 fps"
    )

    started = time.perf_counter()
    replayed = [replay_session(session_items(s)) for s in sessions([open_file(p) for p in files])]
    elapsed = time.perf_counter() - started
    recorded_s = sum(r.duration_s for r in replayed)
    print(
        f"replay: {sum(r.frames for r in replayed)} frames, {sum(len(r.events) for r in replayed)} events, "
        f"{elapsed:.2f} s, {recorded_s / elapsed:.0f}x real time"
    )


def _jitter(values: tuple[float, ...]) -> tuple[float, ...]:
    """The probabilities moved by up to 0.1 % each and summed to one again, as the model's float32 gives them."""
    moved = [v * random.uniform(0.999, 1.001) for v in values]
    total = sum(moved)
    return tuple(float(np.float32(v / total)) for v in moved)


if __name__ == "__main__":
    main()
