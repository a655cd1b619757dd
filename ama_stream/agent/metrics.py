"""Prometheus metrics of the agent, liveness/readiness, and the one small HTTP server for /metrics, /healthz, /readyz."""
from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .delivery.offsets import CommitProgress

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class AgentMetrics:
    """One registry per agent, so several agents (tests) in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("ama_frames_scored", "Frames scored and published", registry=r)
        self.records_refused = Counter(
            "ama_records_refused", "Records the producer or broker refused (too large, invalid); each was "
            "replaced by its fallback (a dead letter, or the dead letter without its value) or given up", ["topic"],
            registry=r)
        self.frames_resized = Counter(
            "ama_frames_resized", "Frames that did not enter the model as they were, by reason (padded, resized, "
            "channels)", ["reason"], registry=r)
        self.alerts = Counter("ama_alerts", "Frames judged anomalous (alerts published)", registry=r)
        self.camera_alerts = Counter(
            "ama_camera_alerts", "Alerts per camera (the first MAX_CAMERA_LABELS cameras by name; the rest count as "
            "camera=\"other\", so an outsider's camera ids cannot grow the label set)", ["camera"], registry=r)
        self._alert_cameras: set[str] = set()
        self.dead_lettered = Counter(
            "ama_frames_dead_lettered", "Frames sent to the dead-letter topic", ["reason"], registry=r
        )
        self.batch_size = Histogram("ama_batch_size", "Frames per scored micro-batch", buckets=_BATCH_BUCKETS, registry=r)
        self.decode_seconds = Histogram(
            "ama_decode_seconds", "Decode + preprocess time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.score_seconds = Histogram("ama_score_seconds", "Scoring time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.publish_seconds = Histogram(
            "ama_publish_seconds", "From handing a batch's records to the producer until they are acknowledged and committed", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.end_to_end_seconds = Histogram(
            "ama_end_to_end_seconds",
            "From a frame's captured-at header to its records being acknowledged",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge("ama_consumer_lag", "Frames not yet committed, per assigned partition",
                                  ["topic", "partition"], registry=r)
        self.broker_errors = Counter("ama_broker_errors", "Failed broker operations (connect, publish, commit)",
                                     ["operation"], registry=r)
        self.fetch_errors = Counter(
            "ama_fetch_errors", "Polls that failed on what was fetched, by reason (unsupported-codec, corrupt-record: "
            "the record is skipped and dead-lettered; fetch-error: no record named, retried)", ["reason"], registry=r)
        self.ready = Gauge("ama_ready", "1 when the agent is connected and scoring", registry=r)
        self.transactions = Counter(
            "ama_transactions", "Exactly-once transactions by how they ended: committed, aborted (the batch "
            "goes out again in a new one, or the agent stopped), dropped (polled before a rebalance: read again)",
            ["result"], registry=r)
        self.commit_stalls = Counter("ama_commit_stalls", "Times frames waited while no commit moved for "
                                     "metrics.commit_stall_s (readiness went to 0)", registry=r)
        self.model = Gauge("ama_model_info", "1 for the model in force", ["model_id"], registry=r)
        self.model_reloads = Counter(
            "ama_model_reloads", "New models (checkpoint + calibration) seen while running, by where they came from "
            "and the outcome (loaded, refused, unchanged)", ["source", "result"], registry=r,
        )
        self.calibration = Gauge("ama_calibration_info", "1 for the calibration in force",
                                 ["calibration_id", "policy"], registry=r)
        self.calibration_reloads = Counter(
            "ama_calibration_reloads", "New calibrations seen while running, by where they came from and the outcome",
            ["source", "result"], registry=r,
        )
        self.drift = Gauge("ama_drift", "1 while a camera's scores are outside the calibration's band (recalibrate)",
                           ["camera"], registry=r)
        self.drift_z_mean = Gauge("ama_drift_z_mean", "Mean z of a camera's recent frames judged normal",
                                  ["camera"], registry=r)
        self.drift_alert_rate = Gauge("ama_drift_alert_rate", "Share of a camera's recent frames judged anomalous",
                                      ["camera"], registry=r)


MAX_CAMERA_LABELS = 1000


def camera_label(metrics: "AgentMetrics", camera: str | None) -> str:
    """The `camera` label of a per-camera metric: the id for the first MAX_CAMERA_LABELS cameras seen,
    "other" after that (ids are outsider input), "none" without one; long ids are cut to 128 characters."""
    name = "none" if camera is None else camera[:128]
    known = metrics._alert_cameras
    if name in known:
        return name
    if len(known) >= MAX_CAMERA_LABELS:
        return "other"
    known.add(name)
    return name


class Health:
    """Liveness (the run loop keeps turning) and readiness (model loaded, broker reachable)."""

    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self._beat = time.monotonic()
        self._ready = False
        self._reason = "starting"
        self._lock = threading.Lock()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        with self._lock:
            self._ready, self._reason = ready, ("ok" if ready else reason or "not ready")

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            return self._ready, self._reason

    def liveness(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._beat
        if idle > self.stall_s:
            return False, f"run loop stalled for {idle:.0f} s"
        return True, "ok"


class Readiness:
    """The one owner of /readyz and ama_ready: broker errors and commit stalls take readiness away,
    a working broker gives it back -- but never while stopping, nor while commits are stalled
    (a stall clears only when commits move). Any thread may call it (Health holds the lock)."""

    def __init__(self, health: Health, metrics: AgentMetrics, stop: threading.Event, commit_stall_s: float):
        self.health = health
        self.metrics = metrics
        self.stop = stop
        self.progress = CommitProgress(commit_stall_s, time.monotonic())

    @property
    def ready(self) -> bool:
        return self.health.readiness()[0]

    def mark_ready(self) -> None:
        if self.stop.is_set() or self.progress.stalled:
            return
        if not self.ready:
            log.info("broker reachable; ready")
        self.health.set_ready(True)
        self.metrics.ready.set(1)

    def broker_error(self, operation: str, reason: str) -> None:
        self.metrics.broker_errors.labels(operation=operation).inc()
        if self.ready:
            log.warning("broker problem during %s (%s); not ready until it recovers", operation, reason)
        self._unready(f"broker unreachable ({operation}: {reason})")

    def check_progress(self, waiting: int, committed_total: int, now: float) -> None:
        """After a successful probe: not ready while work waits and no commit moves, else ready."""
        stalled = self.progress.check(waiting, committed_total, now)
        if stalled is None:
            self.mark_ready()
            return
        if self.ready:
            log.error("not ready: %s (the broker answers; see the dead-letter topic and the publish log)", stalled)
            self.metrics.commit_stalls.inc()
        self._unready(stalled)

    def stopped(self) -> None:
        self._unready("stopped")

    def _unready(self, reason: str) -> None:
        self.health.set_ready(False, reason)
        self.metrics.ready.set(0)


class HealthServer:
    """/metrics (Prometheus text), /healthz, /readyz on one port, served from a daemon thread."""

    def __init__(self, host: str, port: int, metrics: AgentMetrics, health: Health):
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, reason = health.liveness() if path == "/healthz" else health.readiness()
                    self._reply(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._reply(404, b"not found\n", "text/plain; charset=utf-8")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # the message must say which address, or the operator cannot fix it
            raise OSError(exc.errno, f"metrics/health server cannot bind {host}:{port}: {exc.strerror} (choose another "
                                     "with --metrics-port P, or 0 for any free port; metrics.port in the config)") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ama-health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
