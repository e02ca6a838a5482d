"""The README's pipeline speed table, every row measured in one run (``cabin-monitor bench`` per row).

    python ../shared/tools/make_cabin_clip.py ../shared/videos /tmp/cabin5.mp4
    python scripts/speed_table.py --cabin-clip /tmp/cabin5.mp4 [--old-model models/emotionaldan-7-0.5.0.onnx]

The one-occupant rows use the bundled clip (24 fps) and the same frames written at 30 fps; the
five-occupant rows a 1280x720 30 fps clip with the seat zones of deploy/cabin-monitor.example.yaml.
Prints the Markdown table; ``--json FILE`` also writes every bench report.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2

from cabin_monitor.assets import SAMPLE_VIDEO
from cabin_monitor.config import Config
from cabin_monitor.daemon import Overrides, load
from cabin_monitor.logs import configure_logging
from cabin_monitor.tools.bench import run_bench

EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "cabin-monitor.example.yaml"
REGIONS = [
    {"name": "rear_left", "zone": [0.0, 0.0, 0.4, 0.55]},
    {"name": "rear_middle", "zone": [0.3, 0.0, 0.7, 0.55]},
    {"name": "rear_right", "zone": [0.6, 0.0, 1.0, 0.55]},
    {"name": "front", "zone": [0.0, 0.4, 1.0, 1.0]},
]
Change = Callable[[Config], Config]


def with_settings(section: str, **settings: Any) -> Change:
    """A change setting ``settings`` in one section of the configuration."""

    def change(cfg: Config) -> Config:
        part = getattr(cfg, section)
        return cfg.model_copy(update={section: part.model_validate({**part.model_dump(), **settings})})

    return change


def old_defaults(cfg: Config) -> Config:
    """The defaults before faces were followed: short range on every frame, spinning threads, every face read."""
    cfg = with_settings("detector", range="short", every_frames=1)(cfg)
    return with_settings("emotion", thread_spinning=True, max_faces_per_frame=0)(cfg)


def every_face_every_frame(cfg: Config) -> Config:
    """Full range on every frame and no reading budget."""
    cfg = with_settings("detector", range="full", every_frames=1)(cfg)
    return with_settings("emotion", max_faces_per_frame=0)(cfg)


def rewrite_at_30_fps(source: Path, target: Path) -> Path:
    """The frames of ``source`` written again at 30 fps."""
    cap = cv2.VideoCapture(str(source))
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, size)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        writer.write(frame)
    cap.release()
    writer.release()
    return target


def row(name: str, report: dict[str, Any]) -> str:
    """One Markdown row of the table."""
    cam = report["camera_pace"]
    rates = report["occupant_read_hz"]
    slowest = f"{min(rates.values()):.0f} Hz ({len(rates)})" if rates else "–"
    cpu = report["cpu"] or {}
    cores = f"{cpu['cores_used']:.2f} ({100 * cpu['share_of_machine']:.0f} %)" if cpu else "–"
    detect, emotion = report["stages"]["detect"], report["stages"]["emotion"]
    return (
        f"| {name} | {report['faces_per_frame']:.2f} | {report['fps']:.0f} fps | "
        f"{cam['dropped_frames']} of {cam['frames_read']}, {report['e2e_ms']['p50']:.1f} / "
        f"{report['e2e_ms']['p95']:.1f} ms | {slowest} | {cores} | {detect['p50']:.1f} / {detect['p95']:.1f} ms | "
        f"{emotion['p50']:.1f} ms |"
    )


def main() -> None:
    """Run every row and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cabin-clip", type=Path, required=True, help="the five-occupant 1280x720 30 fps clip")
    parser.add_argument("--old-model", type=Path, help="an older model for one more one-occupant row")
    parser.add_argument("--json", type=Path, help="write every bench report here")
    args = parser.parse_args()
    configure_logging("warning", "auto")
    clip = SAMPLE_VIDEO
    with tempfile.TemporaryDirectory() as scratch:
        clip_30 = rewrite_at_30_fps(clip, Path(scratch) / "clip30.mp4")
        one = load(None, Overrides(source=str(clip)))
        one_30 = load(None, Overrides(source=str(clip_30)))
        five = load(EXAMPLE_CONFIG, Overrides(source=str(args.cabin_clip)))
        rows: list[tuple[str, Config]] = [
            ("one occupant, 24 fps clip: **default**", one),
            (
                "one occupant, 24 fps: the old defaults (short range on every frame, spinning threads)",
                old_defaults(one),
            ),
        ]
        if args.old_model is not None:
            rows.append(
                (
                    f"one occupant, 24 fps: default, model {args.old_model.name}",
                    with_settings("emotion", model_path=args.old_model)(one),
                )
            )
        rows += [
            ("one occupant, 30 fps: **default**", one_30),
            ("one occupant, 30 fps: the old defaults", old_defaults(one_30)),
            ("five occupants, 30 fps: **default**", five),
            (
                "five occupants: default with four detector regions, short range",
                with_settings("detector", range="short", regions=REGIONS)(five),
            ),
            ("five occupants: the old defaults", old_defaults(five)),
            ("five occupants: full range on every frame, every face every frame", every_face_every_frame(five)),
        ]
        reports = {name: run_bench(cfg) for name, cfg in rows}
    print(
        "| configuration | faces found per frame | throughput | at camera pace: dropped, frame-to-reading p50 / p95 "
        "| slowest occupant's reading rate (occupants) | CPU at camera pace: cores (share of 2) | detect p50 / p95 "
        "| emotion p50 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, report in reports.items():
        print(row(name, report))
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
