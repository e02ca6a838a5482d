"""The ``cabin-monitor`` command line: the parser, one small function per sub-command, and exit codes.

The work is elsewhere: ``daemon`` (run, demo), ``tools`` (analyze, bench, evaluate, replay, report), ``training``
(train, export, explain). Any ``CabinMonitorError`` becomes one line on stderr and its exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cabin_monitor.errors import CabinMonitorError, ConfigurationError, RuntimeFault
from cabin_monitor.fleet.cli import add_fleet_parser

if TYPE_CHECKING:
    from cabin_monitor.daemon import Overrides


EXIT_CONFIG = ConfigurationError.exit_code
EXIT_RUNTIME = RuntimeFault.exit_code


def _die(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"cabin-monitor: {message}", file=sys.stderr)
    return code


def _config_path(args: argparse.Namespace) -> Path | None:
    return Path(args.config) if getattr(args, "config", None) else None


def _overrides(args: argparse.Namespace, *, fast: bool = False) -> Overrides:
    """The run-time settings a sub-command's flags override (each sub-command has some of them)."""
    from cabin_monitor.daemon import Overrides

    model = getattr(args, "model", None)
    record = getattr(args, "record", None)
    return Overrides(
        source=getattr(args, "source", None),
        loop=getattr(args, "loop", False),
        fast=fast or getattr(args, "fast", False),
        mqtt_url=getattr(args, "mqtt_url", None),
        vehicle_id=getattr(args, "vehicle_id", None),
        model_path=Path(model) if model else None,
        providers=tuple(getattr(args, "provider", None) or ()),
        record_dir=Path(record) if record else None,
    )


# -- run / demo ----------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from cabin_monitor import daemon, preflight
    from cabin_monitor.logs import configure_logging

    config_path = _config_path(args)
    cfg = daemon.load(config_path, _overrides(args))
    configure_logging(cfg.logging.level, cfg.logging.format)
    preflight.refuse_early(cfg)
    preflight.prepare_state_folder(cfg)
    return daemon.run(cfg, config_path)


def cmd_demo(args: argparse.Namespace) -> int:
    from cabin_monitor import daemon
    from cabin_monitor.logs import configure_logging
    from cabin_monitor.tools.annotate import BROWSER_CODECS, DEFAULT_VIDEO_FPS, AnnotatedVideoWriter, video_fps
    from cabin_monitor.vision.capture import parse_source

    cfg = daemon.load(_config_path(args), _overrides(args, fast=True))
    configure_logging(cfg.logging.level, cfg.logging.format)
    out = Path(args.out)
    spec = parse_source(cfg.camera.source)
    fps = args.video_fps or (video_fps(str(spec.target)) if spec.kind == "file" else DEFAULT_VIDEO_FPS)
    writer = AnnotatedVideoWriter(out, fps=fps)
    try:
        code = daemon.run_demo(cfg, on_result=writer)
    finally:
        writer.close()
    note = "" if writer.codec in (*BROWSER_CODECS, "") else " (browsers do not play it: write a .webm file for VP9)"
    print(
        f"annotated video: {out} ({writer.frames} frames, {writer.codec}{note}, {writer.fps:.3f} fps)", file=sys.stderr
    )
    return code


# -- analyze / bench ---------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    from cabin_monitor.config import DetectorConfig
    from cabin_monitor.logs import configure_logging
    from cabin_monitor.tools.analyze import analyze_command

    configure_logging("warning", "auto")
    detector = (
        None
        if args.assume_face
        else DetectorConfig(
            type=args.detector, range=args.range, min_score=args.min_score, min_face_px=16, max_faces=32
        )
    )
    return analyze_command(args.images, Path(args.model) if args.model else None, detector, args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    from cabin_monitor import daemon
    from cabin_monitor.logs import configure_logging
    from cabin_monitor.tools.bench import bench_command

    cfg = daemon.load(_config_path(args), _overrides(args))
    configure_logging("warning", "auto")
    return bench_command(cfg, model_only=args.model_only, runs=args.runs, max_frames=args.frames, as_json=args.json)


# -- check-config / schema ----------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from cabin_monitor import preflight
    from cabin_monitor.config import ConfigError, load_config, redacted
    from cabin_monitor.logs import configure_logging

    try:
        cfg = load_config(Path(args.file))
    except ConfigError as exc:
        configure_logging("warning", "auto")
        every = [*exc.problems, *preflight.rule_class_problems(Path(args.file))]
        return _report_problems(args.file, every, EXIT_CONFIG)
    configure_logging("warning", "auto")
    problems = preflight.problems(cfg)
    if problems:
        # run stops at the first problem, with its exit code.
        return _report_problems(args.file, [str(p) for p in problems], problems[0].exit_code)
    source = redacted(cfg.camera.source)
    print(f"{args.file}: OK (vehicle {cfg.vehicle_id}, source {source}, detector {cfg.detector.type})")
    return 0


def _report_problems(file: str, problems: list[str], code: int) -> int:
    """The command's answer: every problem, one line each, and the exit code ``run`` would give."""
    print(f"{file}: {len(problems)} problem(s)", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return code


def cmd_schema(args: argparse.Namespace) -> int:
    from cabin_monitor.bus.payloads import json_schemas

    schemas = json_schemas()
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, schema in schemas.items():
                (out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        except OSError as exc:
            return _die(f"schema: cannot write to {out}: {exc.strerror or exc}")
        print(f"wrote {len(schemas)} schemas to {out}", file=sys.stderr)
    else:
        print(json.dumps(schemas, indent=2))
    return 0


# -- replay / report (recordings) ---------------------------------------------------------


def _need(module: str, extra: str) -> int | None:
    if importlib.util.find_spec(module) is None:
        return _die(f"this command needs {module}: pip install 'cabin-monitor[{extra}]'", EXIT_RUNTIME)
    return None


def cmd_replay(args: argparse.Namespace) -> int:
    if (code := _need("pyarrow", "report")) is not None:
        return code
    from cabin_monitor.tools.replay import replay_command

    return replay_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    if (code := _need("pyarrow", "report") or _need("matplotlib", "report") or _need("plotly", "report")) is not None:
        return code
    from cabin_monitor.tools.report import report_command

    return report_command(args)


# -- training side (needs the train extra) ----------------------------------------------


def _need_torch() -> int | None:
    # Looked up rather than imported: no module outside training/ loads torch.
    if importlib.util.find_spec("torch") is None:
        return _die("this command needs the training extra: pip install 'cabin-monitor[train]'", EXIT_RUNTIME)
    return None


def cmd_train(args: argparse.Namespace) -> int:
    if (code := _need_torch()) is not None:
        return code
    from pydantic import ValidationError

    from cabin_monitor.config import describe_errors
    from cabin_monitor.training.config import load_train_config
    from cabin_monitor.training.train import TrainingInterrupted, benchmark, train

    try:
        cfg = load_train_config(Path(args.config))
    except ValidationError as exc:
        return _die(f"{args.config}: invalid training configuration\n  " + "\n  ".join(describe_errors(exc)))
    except (OSError, ValueError) as exc:
        return _die(f"{args.config}: {exc}")
    if args.threads:
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"threads": args.threads})})
    if args.benchmark_steps:
        print(json.dumps(benchmark(cfg, Path(args.data), args.device, args.benchmark_steps)))
        return 0
    if not args.out:
        return _die("train: --out is required (the run folder)")
    try:
        metrics = train(cfg, Path(args.data), Path(args.out), device=args.device, progress=not args.no_progress)
    except TrainingInterrupted as exc:
        print(f"cabin-monitor: {exc}", file=sys.stderr)
        return 130
    print(json.dumps({k: v for k, v in metrics.items() if k != "val_confusion"}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if (code := _need_torch()) is not None:
        return code
    from cabin_monitor.training.export import export_run, reexport_onnx

    source = Path(args.source)
    try:
        if source.suffix == ".onnx":
            path = reexport_onnx(
                source,
                Path(args.out),
                model_version=args.model_version,
                mirror=args.mirror_average,
                prior_weight=args.prior_weight,
            )
        else:
            path = export_run(
                source,
                Path(args.out),
                checkpoint=args.checkpoint,
                model_version=args.model_version,
                mirror=args.mirror_average,
                prior_weight=args.prior_weight,
            )
    except (OSError, ValueError) as exc:
        return _die(str(exc))
    print(f"exported {path}", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    if (code := _need_torch()) is not None:
        return code
    from cabin_monitor.training.quantize import quantize_command

    try:
        path, result = quantize_command(
            Path(args.model),
            Path(args.data),
            Path(args.out),
            calibration_faces=args.calibration_faces,
            check_faces=args.check_faces,
            min_agreement=args.min_agreement,
        )
    except (OSError, ValueError, KeyError) as exc:
        return _die(str(exc))
    print(json.dumps({"model": str(path), **result.to_dict()}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cabin_monitor.tools.evaluate import evaluate_command

    return evaluate_command(args)


def cmd_explain(args: argparse.Namespace) -> int:
    if (code := _need_torch()) is not None:
        return code
    from cabin_monitor.training.explain import explain_command

    return explain_command(args)


# -- parser -------------------------------------------------------------------------------


def _run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--config", help="YAML configuration file (default: built-in defaults)")
    run.add_argument("--source", help="camera index, /dev/videoN, video file, rtsp:// URL or gst:PIPELINE")
    run.add_argument("--mqtt-url", help="broker, mqtt://host:port (overrides the file)")
    run.add_argument("--vehicle-id", help="vehicle id used in topics (overrides the file)")
    run.add_argument("--loop", action="store_true", help="replay a video file when it ends")
    run.add_argument("--fast", action="store_true", help="process every frame of a video file as fast as possible")
    run.add_argument("--record", metavar="DIR", help="record what the rules engine sees into DIR (record.dir)")


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--config", help="YAML configuration file (default: built-in defaults)")
    demo.add_argument("--source", help="video file instead of the bundled sample")
    demo.add_argument("--model", help="emotion ONNX model instead of the bundled one")
    demo.add_argument(
        "--out",
        default="cabin-monitor-demo.webm",
        help="annotated video to write: .webm (VP9, plays in browsers) or .mp4 (H.264 where OpenCV has an encoder,"
        " else MPEG-4 Part 2)",
    )
    demo.add_argument("--record", metavar="DIR", help="record what the rules engine sees into DIR (record.dir)")
    demo.add_argument(
        "--video-fps", type=float, default=None, help="frame rate of the written video (default: the source's)"
    )


def _analyze_arguments(an: argparse.ArgumentParser) -> None:
    an.add_argument("images", nargs="+", help="image files")
    an.add_argument("--json", action="store_true", help="one JSON object per image")
    an.add_argument("--assume-face", action="store_true", help="the whole image is one pre-cropped face")
    an.add_argument("--model", help="emotion ONNX model (default: the bundled one)")
    an.add_argument(
        "--detector",
        choices=["yunet", "blazeface"],
        default="yunet",
        help="face detector for photos (default: yunet, which suits any image size)",
    )
    an.add_argument("--range", choices=["short", "full"], default="full", help="BlazeFace model range")
    an.add_argument("--min-score", type=float, default=0.6, help="minimum detection score")


def _check_config_arguments(cc: argparse.ArgumentParser) -> None:
    cc.add_argument("file", help="the YAML configuration file")


def _schema_arguments(sc: argparse.ArgumentParser) -> None:
    sc.add_argument("--out", help="write one <name>.schema.json per payload into this folder")


def _bench_arguments(be: argparse.ArgumentParser) -> None:
    be.add_argument("--source", default="sample", help="video file (default: the bundled sample)")
    be.add_argument("--config", help="YAML configuration file")
    be.add_argument("--model", help="emotion ONNX model")
    be.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    be.add_argument("--json", action="store_true", help="print one JSON object")
    be.add_argument("--model-only", action="store_true", help="time the emotion model alone at batch 1, 2 and 4")
    be.add_argument("--runs", type=int, default=200, help="--model-only: timed calls per batch size")
    be.add_argument(
        "--provider",
        action="append",
        choices=["tensorrt", "cuda", "cpu"],
        help="execution provider, in order of preference (repeatable; default: cpu)",
    )


def _replay_arguments(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("recordings", nargs="+", metavar="RECORDING", help="recording files, folders or globs")
    _add_rules_options(rp)
    rp.add_argument("--no-events", action="store_true", help="print only the summary")
    rp.add_argument("--summary-json", metavar="FILE", help="also write the summary (and any comparison) as JSON")
    rp.add_argument(
        "--compare",
        action="store_true",
        help="replay with a second rule set B too and print the alerts it adds or removes (JSON lines)",
    )
    rp.add_argument("--config-b", metavar="FILE", help="--compare: rule set B from this configuration file's rules")
    rp.add_argument(
        "--set-b",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--compare: a rule of set B, over the recording's own rules or --config-b (repeatable)",
    )
    rp.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="PATH=START:STOP:STEP",
        help="replay at every value of a rule (e.g. rules.stress.enter_score=0.5:0.9:0.05), reading the "
        "recordings once; alerts per vehicle-hour per value instead of events; twice for a grid",
    )
    rp.add_argument(
        "--target-rate",
        type=float,
        metavar="R",
        help="--sweep: name the value giving at most R alerts per vehicle-hour, and the command rolling it out",
    )
    rp.add_argument(
        "--scheduler", metavar="ADDRESS", help="run on the Dask cluster of this scheduler (tcp://HOST:8786)"
    )
    rp.add_argument("--workers", type=int, metavar="N", help="run on a local Dask cluster of N worker processes")


def _report_arguments(rr: argparse.ArgumentParser) -> None:
    rr.add_argument("recordings", nargs="+", metavar="RECORDING", help="recording files, folders or globs")
    rr.add_argument("--out", required=True, help="folder for the PNGs and index.html (self-contained, works offline)")
    _add_rules_options(rr)


def _train_arguments(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--config", required=True, help="training YAML (see models/configs/)")
    tr.add_argument("--data", required=True, help="folder holding the data files named in the config")
    tr.add_argument("--out", help="run folder; an existing run there is resumed (required unless benchmarking)")
    tr.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tr.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    tr.add_argument(
        "--benchmark-steps",
        type=int,
        metavar="N",
        help="time N training steps and print faces/s and the share of data, forward and backward; trains nothing",
    )


def _export_arguments(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("source", help="run folder, or an exported .onnx model to write again (e.g. mirror-averaged)")
    ex.add_argument("--out", required=True, help="ONNX file to write")
    ex.add_argument("--checkpoint", default="best.pt", help="checkpoint in the run folder (run folders only)")
    ex.add_argument("--model-version", default=None, help="version string stored in the model")
    ex.add_argument(
        "--prior-weight",
        type=float,
        default=None,
        help="put this share of the training class prior back onto the logits (0: uniform prior, 1: the data's)",
    )
    ex.add_argument(
        "--mirror-average",
        action="store_true",
        help="read each face and its mirror image and average the answers (twice the model time)",
    )


def _quantize_arguments(qp: argparse.ArgumentParser) -> None:
    qp.add_argument("model", help="exported EmotionalDAN ONNX model (float32)")
    qp.add_argument("--data", required=True, help="folder with fer2013_train/val.npz and landmarks68_train.npz")
    qp.add_argument("--out", required=True, help="int8 ONNX file to write (e.g. models/emotionaldan-7.int8.onnx)")
    qp.add_argument("--calibration-faces", type=int, default=800, help="training faces the int8 ranges come from")
    qp.add_argument("--check-faces", type=int, default=1500, help="validation faces the agreement is measured on")
    qp.add_argument(
        "--min-agreement", type=float, default=0.99, help="refuse to write a model agreeing on fewer top-1 answers"
    )


def _evaluate_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--model", required=True, help="EmotionalDAN ONNX model")
    ev.add_argument("--data", required=True, help=".npz file (emotion labels or 68-point landmarks)")
    ev.add_argument("--peer", help="peer emotion model (mini-Xception ONNX) to compare on the same images")
    ev.add_argument("--out", default=None, help="folder for the confusion-matrix PNG and a JSON report")
    ev.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ev.add_argument(
        "--detail-px",
        type=int,
        default=None,
        help="landmark data: read the faces again at this detail level and report how far the answers move",
    )
    ev.add_argument(
        "--holdout-only",
        action="store_true",
        help="landmark data: score only the 15%% held out from training (by photo)",
    )


def _explain_arguments(xp: argparse.ArgumentParser) -> None:
    xp.add_argument("images", nargs="*", help="face images (pre-cropped, or found with the detector)")
    xp.add_argument("--model", default=None, help="EmotionalDAN ONNX model (default: the bundled one)")
    xp.add_argument("--out", required=True, help="folder for the heat-map PNGs")
    xp.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        help="also explain this class (repeatable); default: the predicted one",
    )
    xp.add_argument("--assume-face", action="store_true", help="the images are pre-cropped faces")
    xp.add_argument("--mean-by-class", metavar="NPZ", help="average map per emotion over a labelled .npz")
    xp.add_argument("--limit", type=int, default=2000, help="images used from the .npz for --mean-by-class")


EXIT_CODES_RUN = (
    "0 stopped (SIGTERM) or the video file ended; 1 a fault a restart may cure (systemd restarts it); "
    "2 a setup error: configuration, model, source, state folder"
)
EXIT_CODES_TOOL = "0 done; 1 a fault while running or a missing extra; 2 bad arguments or configuration"


@dataclass(frozen=True)
class SubCommand:
    """One sub-command: its name, one-line help, what it does, an example, its exit codes, its arguments and
    the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    description: str
    example: str
    exit_codes: str = EXIT_CODES_TOOL

    def epilog(self) -> str:
        codes = "\n".join(f"  {line.strip()}" for line in self.exit_codes.split(";"))
        return f"example:\n  {self.example}\n\nexit codes:\n{codes}"


SUBCOMMANDS = (
    SubCommand(
        "run",
        "run the monitoring daemon",
        _run_arguments,
        cmd_run,
        "Watch the cabin through the configured camera and send events, state and health over MQTT (or print "
        "events as JSON lines without a broker). SIGTERM drains and stops; SIGHUP reloads the rules.",
        "cabin-monitor run --config /etc/cabin-monitor/cabin-monitor.yaml --source /dev/video0",
        EXIT_CODES_RUN,
    ),
    SubCommand(
        "demo",
        "run on the bundled sample video; events to stdout, annotated video to a file",
        _demo_arguments,
        cmd_demo,
        "Run the whole pipeline on a video file (the bundled sample by default) without a broker: events as "
        "JSON lines on stdout, and a video with boxes, landmarks and emotion bars.",
        "cabin-monitor demo --source cabin.mp4 --out annotated.webm",
        EXIT_CODES_RUN,
    ),
    SubCommand(
        "analyze",
        "read faces and emotions in still images",
        _analyze_arguments,
        cmd_analyze,
        "Find the faces in each image and read their emotions; one line (or JSON object) per image.",
        "cabin-monitor analyze --json photo1.jpg photo2.jpg",
    ),
    SubCommand(
        "check-config",
        "validate a configuration file",
        _check_config_arguments,
        cmd_check_config,
        "Report every problem of a configuration file with its YAML path and line, and what run checks before "
        "the camera: vehicle settings, the extras the file needs, the source, models, rule classes, TLS files.",
        "cabin-monitor check-config /etc/cabin-monitor/cabin-monitor.yaml",
        "0 run would start; 1 or 2 the exit code run would give for the first problem (2 a setup error)",
    ),
    SubCommand(
        "schema",
        "print the JSON schemas of the MQTT payloads",
        _schema_arguments,
        cmd_schema,
        "Print the JSON schema of every MQTT payload, or write one file each.",
        "cabin-monitor schema --out schemas/",
    ),
    SubCommand(
        "bench",
        "measure fps and per-stage latency on a video, CPU provider by default",
        _bench_arguments,
        cmd_bench,
        "Run the threaded pipeline on a video as fast as it goes and at the file's own frame rate, and report "
        "throughput, per-stage latency, frame-to-reading latency and CPU share; or time the model alone.",
        "cabin-monitor bench --source cabin5.mp4 --config five-seats.yaml --json",
    ),
    SubCommand(
        "replay",
        "run the rules over recordings (run --record): events as JSON lines on stdout, alert rates on stderr",
        _replay_arguments,
        cmd_replay,
        "Run the rules engine over recordings of what it saw, with their own rules or changed ones; compare "
        "two rule sets, sweep a threshold, or run on a Dask cluster.",
        "cabin-monitor replay rec/ --set rules.stress.enter_score=0.7 --no-events",
    ),
    SubCommand(
        "report",
        "timeline pictures (PNG) and one interactive HTML page of recordings: scores, rules in force, events",
        _report_arguments,
        cmd_report,
        "Draw each recording's scores, thresholds and events over time, and one self-contained interactive HTML "
        "page of them all, with the rules in force.",
        "cabin-monitor report rec/ --out report/",
    ),
    SubCommand(
        "train",
        "train EmotionalDAN (needs the train extra)",
        _train_arguments,
        cmd_train,
        "Train the emotion and landmark network from a training configuration; an existing run folder resumes.",
        "cabin-monitor train --config models/configs/emotionaldan-7.yaml --data ../shared/data --out runs/r1",
        "0 done; 1 a fault or a missing extra; 2 bad arguments or training configuration; 130 interrupted "
        "(checkpointed: the same command resumes)",
    ),
    SubCommand(
        "export",
        "export a trained run to ONNX, or re-export an exported model (needs the train extra)",
        _export_arguments,
        cmd_export,
        "Write a trained run (or an exported model, e.g. mirror-averaged) as the ONNX model the daemon reads.",
        "cabin-monitor export runs/r1 --out models/emotionaldan-7.onnx --mirror-average",
    ),
    SubCommand(
        "quantize",
        "write the int8 version of an exported model for the CPU (needs the train extra)",
        _quantize_arguments,
        cmd_quantize,
        "Quantise an exported model to int8 (onnxruntime static QDQ, geometry kept in float32), calibrated on "
        "training faces; measure its top-1 agreement with the float32 model on validation faces and refuse "
        "below --min-agreement.",
        "cabin-monitor quantize models/emotionaldan-7.onnx --data ../shared/data --out models/emotionaldan-7.int8.onnx",
    ),
    SubCommand(
        "evaluate",
        "accuracy, confusion matrix and landmark NME of an ONNX model",
        _evaluate_arguments,
        cmd_evaluate,
        "Score an exported model on labelled faces: accuracy and confusion matrix, or landmark NME.",
        "cabin-monitor evaluate --model models/emotionaldan-7.onnx --data ../shared/data/fer2013_val.npz",
    ),
    SubCommand(
        "explain",
        "class-activation heat maps (HiResCAM) of the emotion decision (needs the train extra)",
        _explain_arguments,
        cmd_explain,
        "Draw where in the face the emotion decision looks, per image or averaged per emotion.",
        "cabin-monitor explain face.jpg --out maps/",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command in ``SUBCOMMANDS``."""
    p = argparse.ArgumentParser(prog="cabin-monitor", description="The ``cabin-monitor`` command line.")
    p.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version, the bundled model's version, onnxruntime's version and providers, and exit",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        parser = sub.add_parser(
            command.name,
            help=command.help,
            description=textwrap.fill(command.description, 100),
            epilog=command.epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(parser)
        parser.set_defaults(func=command.handler)
    add_fleet_parser(sub)
    return p


def _add_rules_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="take the rules from this configuration file (default: each recording's own rules)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one rule, e.g. rules.stress.enter_score=0.7 (repeatable; over the recording's rules or --config)",
    )


def version_text() -> str:
    """What ``--version`` prints: this package, the bundled emotion model, onnxruntime and its providers."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        lines = [f"cabin-monitor {version('cabin-monitor')}"]
    except PackageNotFoundError:
        lines = ["cabin-monitor (not installed)"]
    if not _have_onnxruntime():
        return "\n".join([*lines, f"onnxruntime: not installed ({_ONNXRUNTIME_HINT})"])
    import onnxruntime as ort

    from cabin_monitor.assets import DEFAULT_EMOTION_MODEL, find_model

    try:
        path = find_model(DEFAULT_EMOTION_MODEL)
        meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
        lines.append(f"model {path.name} {meta.custom_metadata_map.get('model_version', 'unknown')} ({path})")
    except CabinMonitorError as exc:
        lines.append(f"model: {exc}")
    lines.append(f"onnxruntime {ort.__version__}, providers: {', '.join(ort.get_available_providers())}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        print(version_text())
        parser.exit()


# Sub-commands that run the ONNX models, so need one of the two onnxruntime builds.
_NEEDS_ONNXRUNTIME = frozenset({"run", "demo", "analyze", "bench", "evaluate", "export", "explain"})
_ONNXRUNTIME_HINT = "install 'cabin-monitor[cpu]', or 'cabin-monitor[gpu]' on an NVIDIA machine"


def _have_onnxruntime() -> bool:
    # Looked up, not imported: a check, not a load.
    return importlib.util.find_spec("onnxruntime") is not None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cabin-monitor`` command."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # quiet MediaPipe's C++ start-up lines
    # FFmpeg reads its log level once, at first use, and would print a line per damaged packet of a file
    # cut short (the capture logs that once, with the frame counts) and the demo writer's H.264 probe
    # (absent from OpenCV's pip builds); OPENCV_FFMPEG_LOGLEVEL=24 brings its warnings back.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    args = build_parser().parse_args(argv)
    if args.command in _NEEDS_ONNXRUNTIME and not _have_onnxruntime():
        return _die(f"'{args.command}' needs onnxruntime: {_ONNXRUNTIME_HINT}", EXIT_RUNTIME)
    try:
        return int(args.func(args))
    except CabinMonitorError as exc:
        return _die(str(exc), exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
