"""Threads, hand-over and shutdown: capture thread -> latest-frame mailbox -> inference thread -> sink.

The main thread supervises: it feeds the systemd watchdog while both stage
threads show progress (frames, or a camera being reopened: the watchdog proves
the daemon is alive, not that a camera is plugged in; a hung stage or a hung
camera call stops the pings), logs throughput and latency, publishes health, and
stops everything on a signal, at end of file, or when a stage thread dies (exit
code 1, so systemd restarts the service; a setup error such as a video file
without frames exits 2, which systemd does not restart).

The sink, the rules in force, the request worker and SIGHUP's work are injected (``runtime.ports``):
the runtime imports no bus module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from cabin_monitor.config import Config
from cabin_monitor.errors import CabinMonitorError
from cabin_monitor.messages import CameraState, Event, Frame, FrameResult, HealthSnapshot, PipelineMetrics
from cabin_monitor.metrics import LatencyHistogram, LatencyWindow, RateWindow
from cabin_monitor.record.sink import RecordingSink
from cabin_monitor.rules.in_force import RulesInForce
from cabin_monitor.rules.shadow import ShadowRules
from cabin_monitor.runtime import cpu
from cabin_monitor.runtime.mailbox import LatestMailbox
from cabin_monitor.runtime.ports import EventSink, RequestWorker
from cabin_monitor.runtime.processor import STAGES, FrameProcessor
from cabin_monitor.runtime.sdnotify import SystemdNotifier
from cabin_monitor.vision.capture import FrameSource, SourceEnded

log = structlog.get_logger("cabin_monitor.runtime.pipeline")
JOIN_TIMEOUT_S = 5.0
EXIT_OK = 0
EXIT_STAGE_FAILED = 1
# Histogram buckets, seconds: the stages take 1 to 100 ms; capture to reading adds the wait in the mailbox.
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
FRAME_TO_READING_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class _Counters:
    frames_processed: int = 0
    stale_frames: int = 0
    events: int = 0
    last_processed_s: float = 0.0
    events_by_kind: dict[tuple[str, str], int] = field(default_factory=dict)  # by (type, phase)


@dataclass
class _Supervision:
    """The supervising loop's memory: when it last did each periodic step, and what it last reported."""

    watchdog_s: float | None
    last_watchdog: float = -1e18
    last_stats: float = -1e18
    last_health: float = -1e18
    last_health_key: tuple[object, ...] | None = None
    last_camera_state: CameraState | None = None
    stop_logged: bool = False


class Pipeline:
    """Runs the daemon until the source ends, a stop is requested, or a stage fails."""

    def __init__(
        self,
        cfg: Config,
        processor: FrameProcessor,
        source: FrameSource,
        sink: EventSink,
        rules: RulesInForce,
        notifier: SystemdNotifier | None = None,
        on_result: Callable[[FrameResult], None] | None = None,
        on_health: Callable[[HealthSnapshot, PipelineMetrics], None] | None = None,
        stop_event: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        recorder: RecordingSink | None = None,
        remote: RequestWorker | None = None,
        on_reload: Callable[[], None] | None = None,
        shadow: ShadowRules | None = None,
    ) -> None:
        self.cfg = cfg
        self.processor = processor
        self.source = source
        self.sink = sink
        self.rules_in_force = rules  # changes reach the engine between two frames
        self.shadow_rules = shadow  # likewise for the shadow engine, whose events go to submit_shadow_event
        self.remote = remote  # operators' requests over the broker, answered by a worker of their own
        self.notifier = notifier or SystemdNotifier()
        self.on_result = on_result
        self.on_health = on_health
        self.recorder = recorder  # the rules engine's inputs and events, for offline replay
        self._last_cpu: cpu.CpuSample | None = None
        self._clock = clock
        self._wall = wall_clock
        self.stop_event = stop_event or threading.Event()
        self.mailbox: LatestMailbox[Frame] = LatestMailbox()
        self.stage_ms = {name: LatencyWindow() for name in (*STAGES, "e2e")}
        self.stage_latency = {name: LatencyHistogram(STAGE_BUCKETS_S) for name in STAGES}
        self.frame_to_reading = LatencyHistogram(FRAME_TO_READING_BUCKETS_S)
        self._counters = _Counters()
        self._counter_lock = threading.Lock()
        self._failure: str | None = None
        self._failure_exit_code = EXIT_STAGE_FAILED
        self._inference_alive_s = clock()
        self._threads: list[threading.Thread] = []
        self._inference_done = threading.Event()
        self._fps = RateWindow()
        self._stop_reason: str | None = None
        self._reload_requested = threading.Event()
        self.on_reload = on_reload  # SIGHUP's work, run by the supervising loop

    # -- control -----------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Ask every loop to finish. Only sets flags, so it is safe in a signal handler."""
        self._stop_reason = self._stop_reason or reason
        self.stop_event.set()

    def request_reload(self) -> None:
        """Ask the supervising loop to call ``on_reload`` (safe in a signal handler)."""
        self._reload_requested.set()

    @property
    def failure(self) -> str | None:
        """Why a stage thread died, if one did."""
        return self._failure

    # -- threads -----------------------------------------------------------------

    def _guard(self, name: str, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except CabinMonitorError as exc:
                # A fault the daemon can name (a video file without frames, a model that will not load):
                # one clear line and the exit code of its kind, no traceback.
                log.error("stage thread stopped", thread=name, error=str(exc), exit_code=exc.exit_code)
                self._failure_exit_code = exc.exit_code
                self._failure = f"{name}: {exc}"
                self.stop_event.set()
            except Exception as exc:
                log.exception("stage thread failed", thread=name, error=repr(exc))
                self._failure = f"{name}: {exc!r}"
                self.stop_event.set()

        return run

    def _capture_loop(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    frame = self.source.read()
                except SourceEnded as end:
                    log.info("source ended", reason=str(end))
                    return
                if self.source.paced_realtime:
                    self.mailbox.put(frame)
                elif not self.mailbox.put_wait(frame, self.stop_event):
                    return
        finally:
            self.mailbox.close()
            self.source.release()

    def _inference_loop(self) -> None:
        try:
            while True:
                self._inference_alive_s = self._clock()
                self._take_rule_changes()
                if self.stop_event.is_set():
                    break
                frame = self.mailbox.get(timeout_s=0.5)
                if frame is None:
                    if self.mailbox.closed and self.mailbox.empty():
                        break
                    continue
                if self.source.paced_realtime:
                    age_ms = (self._clock() - frame.capture_s) * 1000.0
                    if age_ms > self.cfg.pipeline.max_frame_age_ms:
                        with self._counter_lock:
                            self._counters.stale_frames += 1
                        continue
                self._handle(self.processor.process(frame))
            close_s, close_wall_s = self._last_capture_s(), self._wall()
            closing = self.processor.rules.close_all(close_s, close_wall_s)
            if self.recorder is not None:
                self.recorder.record_close(closing, close_s, close_wall_s)
            self._submit(closing)
            self._close_shadow(close_s, close_wall_s)
        finally:
            self._inference_done.set()

    def _take_rule_changes(self) -> None:
        """Put the live and shadow rules changed since the last frame in force."""
        pending = self.rules_in_force.take_pending()
        if pending is not None:
            self.processor.reconfigure_rules(pending)
            log.info("rules reconfigured")
            if self.recorder is not None:
                self.recorder.record_rules(pending, self._last_capture_s(), self._wall())
        shadow = None if self.shadow_rules is None else self.shadow_rules.take_pending()
        if shadow is not None:
            if shadow.rules is None:
                self._close_shadow(self._last_capture_s(), self._wall())
            self.processor.reconfigure_shadow(shadow.rules)
            log.info("shadow rules reconfigured", running=shadow.rules is not None)

    def _close_shadow(self, now_s: float, wall_time_s: float) -> None:
        """End the shadow engine's open events, so each shadow start has an end too."""
        if self.processor.shadow is not None:
            for event in self.processor.shadow.close_all(now_s, wall_time_s):
                self.sink.submit_shadow_event(event)

    def _last_capture_s(self) -> float:
        return self._clock() if self.source.paced_realtime else self._counters.last_processed_s

    def _submit(self, events: Iterable[Event]) -> None:
        """Hand events to the sink, each counted once by type and phase."""
        for event in events:
            self.sink.submit_event(event)
            kind = (event.type, event.phase.value)
            with self._counter_lock:
                self._counters.events += 1
                self._counters.events_by_kind[kind] = self._counters.events_by_kind.get(kind, 0) + 1

    def _measure(self, result: FrameResult) -> None:
        """Each stage's latency (and capture to reading at camera pace) into the windows and histograms."""
        for name, ms in result.stage_ms.items():
            self.stage_ms[name].add(ms)
            if name in self.stage_latency:
                self.stage_latency[name].observe(ms / 1000.0)
        if self.source.paced_realtime:
            e2e_s = self._clock() - result.frame.capture_s
            self.stage_ms["e2e"].add(e2e_s * 1000.0)
            self.frame_to_reading.observe(e2e_s)

    def _handle(self, result: FrameResult) -> None:
        frame = result.frame
        self._measure(result)
        self._submit(result.events)
        for event in result.shadow_events:
            self.sink.submit_shadow_event(event)
        now = self._clock()
        publish_state = self._state_due(now)
        # The engine's occupants after this frame, taken once for the recording and the state topic.
        states = self.processor.rules.occupants() if publish_state or self.recorder is not None else []
        if self.recorder is not None:
            self.recorder.record_frame(result, states)
        with self._counter_lock:
            self._counters.frames_processed += 1
            self._counters.last_processed_s = frame.capture_s if not self.source.paced_realtime else now
            self._fps.add(now)
        if publish_state:
            self.sink.publish_state(states, frame.wall_time_s)
        if self.on_result is not None:
            self.on_result(result)

    _last_state_s = -1e18

    def _state_due(self, now: float) -> bool:
        """Whether the occupant state topic is due (``mqtt.state_interval_s``); if so, it counts as sent now."""
        interval = self.cfg.mqtt.state_interval_s
        if interval <= 0 or now - self._last_state_s < interval:
            return False
        self._last_state_s = now
        return True

    # -- supervision ---------------------------------------------------------------

    def processed_fps(self) -> float:
        """Frames processed per second over the recent window."""
        return self._fps.per_s()

    def health(self) -> HealthSnapshot:
        """The current health snapshot (the sink makes the health payload of it)."""
        with self._counter_lock:
            counters = _Counters(**vars(self._counters))
        model = self.processor.model
        return HealthSnapshot(
            wall_time_s=self._wall(),
            camera=self.source.stats(),
            camera_fps=self.source.delivered_fps(),
            processed_fps=self.processed_fps(),
            frames_processed=counters.frames_processed,
            dropped_frames=self.mailbox.dropped,
            stale_frames=counters.stale_frames,
            model_path=str(model.info.path),
            providers_requested=tuple(model.providers_requested),
            provider_in_use=model.provider_in_use,
            sink=self.sink.stats(),
            broker_required=self.cfg.mqtt.url is not None,
            failure=self._failure,
            remote=None if self.remote is None else self.remote.stats(),
            model_version=model.info.version,
        )

    def metrics(self) -> PipelineMetrics:
        """The latency histograms and event counts since start-up."""
        with self._counter_lock:
            events = dict(self._counters.events_by_kind)
        return PipelineMetrics(
            stage_latency={name: h.snapshot() for name, h in self.stage_latency.items()},
            frame_to_reading=self.frame_to_reading.snapshot(),
            events=events,
        )

    def alive(self, now: float) -> bool:
        """Whether both stage threads showed progress within ``pipeline.watchdog_stall_s``: the inference
        thread went round its loop (it wakes every 0.5 s without frames), and the capture side read,
        opened or ticked in a wait between reopen attempts (or ended). The watchdog is fed only then."""
        limit = self.cfg.pipeline.watchdog_stall_s
        inference = not self._inference_done.is_set() and now - self._inference_alive_s < limit
        capture = self.mailbox.closed or now - self.source.last_alive_s < limit
        return inference and capture

    def _log_stats(self) -> None:
        with self._counter_lock:
            counters = _Counters(**vars(self._counters))
        cam = self.source.stats()
        sink = self.sink.stats()
        # The daemon's own CPU share since the last stats line: CPU-seconds per second, in all and per thread.
        now_cpu = cpu.sample()
        cpu_share = None if self._last_cpu is None else cpu.share(self._last_cpu, now_cpu)
        self._last_cpu = now_cpu
        log.info(
            "stats",
            fps=self.processed_fps(),
            frames=counters.frames_processed,
            dropped_frames=self.mailbox.dropped,
            stale_frames=counters.stale_frames,
            corrupt_frames=cam.corrupt_frames,
            camera=cam.state.value,
            events=counters.events,
            outbox_depth=sink.outbox_depth,
            mqtt_connected=sink.connected,
            latency_ms=self.latency_ms(),
            cpu_cores=None if cpu_share is None else round(cpu_share.cores_used, 3),
            cpu_by_thread=None if cpu_share is None else cpu_share.as_dict()["by_thread"],
        )

    def latency_ms(self) -> dict[str, dict[str, float]]:
        """p50/p95 of each stage's recent latency (and e2e at camera pace).

        A latency with no sample (e2e when a file is read as fast as it goes) is left out, not shown as 0.
        """
        return {name: w.percentiles() for name, w in self.stage_ms.items() if not w.empty()}

    def run(self) -> int:
        """Start the threads, supervise until done, shut down; returns the process exit code."""
        inference = self._start()
        ticks = _Supervision(watchdog_s=self.notifier.watchdog_interval_s())
        while not self._inference_done.is_set():
            self._wait_tick(ticks)
            now = self._clock()
            if self.stop_event.is_set() and not inference.is_alive():
                break
            self._serve_reload()
            self._feed_watchdog(now, ticks)
            self._watch_camera(now, ticks)
            self._log_stats_when_due(now, ticks)
            self._report_health(now, ticks)
        return self._shutdown()

    def _start(self) -> threading.Thread:
        """Start the sinks and the stage threads, tell systemd the daemon is ready; returns the inference thread."""
        if self.remote is not None:
            self.remote.start()
        self.sink.start()
        if self.recorder is not None:
            self.recorder.start()
        self.processor.model.warm_up()
        capture = threading.Thread(target=self._guard("capture", self._capture_loop), name="capture", daemon=True)
        inference = threading.Thread(
            target=self._guard("inference", self._inference_loop), name="inference", daemon=True
        )
        self._threads = [capture, inference]
        for t in self._threads:
            t.start()
        self.notifier.ready(f"watching {self.source.shown_source}")
        log.info(
            "ready",
            vehicle_id=self.cfg.vehicle_id,
            source=self.source.shown_source,
            model=str(self.processor.model.info.path),
            provider=self.processor.model.provider_in_use,
        )
        return inference

    def _wait_tick(self, ticks: _Supervision) -> None:
        """Sleep until the next tick (at most 0.25 s); once stopping, wait for inference to finish instead."""
        if self.stop_event.is_set():
            if not ticks.stop_logged:
                log.info("stopping", reason=self._stop_reason or self._failure or "stop requested")
                ticks.stop_logged = True
            self._inference_done.wait(0.25)
        else:
            self.stop_event.wait(0.25)

    def _serve_reload(self) -> None:
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            if self.on_reload is not None:
                self.on_reload()

    def _feed_watchdog(self, now: float, ticks: _Supervision) -> None:
        if ticks.watchdog_s is not None and now - ticks.last_watchdog >= ticks.watchdog_s and self.alive(now):
            self.notifier.watchdog()
            ticks.last_watchdog = now

    def _watch_camera(self, now: float, ticks: _Supervision) -> None:
        """Mark a camera whose read has not come back as stalled; tell systemd of each camera state change."""
        if self.source.paced_realtime and self.source.stats().state == CameraState.STREAMING:
            # A camera read that has not come back (a slow model is not a stalled camera).
            silent_s = now - self.source.last_alive_s
            if silent_s > self.cfg.camera.read_timeout_s:
                self.source.mark_stalled(f"no frame for {silent_s:.1f} s")
        camera_state = self.source.stats().state
        if camera_state != ticks.last_camera_state:
            self.notifier.status(f"camera {camera_state.value}: {self.source.shown_source}")
            ticks.last_camera_state = camera_state

    def _log_stats_when_due(self, now: float, ticks: _Supervision) -> None:
        if now - ticks.last_stats >= self.cfg.logging.stats_interval_s:
            self._log_stats()
            ticks.last_stats = now

    def _report_health(self, now: float, ticks: _Supervision) -> None:
        """Health to the metrics on every tick, and to the sink on a change or every ``health_interval_s``."""
        health = self.health()
        if self.on_health is not None:
            self.on_health(health, self.metrics())
        key = (health.status, health.camera.state, health.sink.connected, health.last_error)
        if key != ticks.last_health_key or now - ticks.last_health >= self.cfg.mqtt.health_interval_s:
            self.sink.publish_health(health)
            ticks.last_health, ticks.last_health_key = now, key

    def _shutdown(self) -> int:
        self.notifier.stopping()
        self.stop_event.set()
        for t in reversed(self._threads):
            t.join(JOIN_TIMEOUT_S)
            if t.is_alive():
                log.error("thread did not stop in time", thread=t.name, timeout_s=JOIN_TIMEOUT_S)
        if self.recorder is not None:
            self.recorder.stop(JOIN_TIMEOUT_S)
        self._log_stats()
        if self.remote is not None:
            self.remote.stop(JOIN_TIMEOUT_S)
        try:
            self.sink.publish_health(self.health())
        finally:
            self.sink.stop(flush_timeout_s=10.0)
            self.processor.close()
        if self._failure:
            log.error("stopped after a stage failure", failure=self._failure, exit_code=self._failure_exit_code)
            return self._failure_exit_code
        log.info("stopped", frames=self._counters.frames_processed, events=self._counters.events)
        return EXIT_OK
