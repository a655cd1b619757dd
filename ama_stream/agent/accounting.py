"""What happens to an acknowledged batch besides its commit: counters, latency, misfit warnings
(`Accounting`) and the per-camera drift of its scores (`DriftWatch`). Both run on the run loop's
thread, for published frames only."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from ama_stream.calibration import Calibration
from ama_stream.drift import CameraDrift, DriftBand, DriftMonitor

from .decode import DecodedBatch
from .metrics import AgentMetrics, camera_label
from .score import ScoredBatch

log = logging.getLogger(__name__)

MISFIT_LOG_S = 600.0  # frames resized or converted for the model: a warning at most this often


@dataclass
class AgentStats:
    """Counters since start; read by the demo and benchmarks (the metrics endpoint has the same)."""

    scored: int = 0
    alerts: int = 0
    dead_lettered: int = 0


class Accounting:
    def __init__(self, metrics: AgentMetrics, stats: AgentStats):
        self.metrics = metrics
        self.stats = stats
        self._misfit_logged = -math.inf

    def add(self, batch: DecodedBatch, result: ScoredBatch, publish_s: float) -> None:
        m = self.metrics
        m.batch_size.observe(batch.size)
        m.decode_seconds.observe(batch.decode_s)
        if result.scored:
            m.score_seconds.observe(result.score_s)
        m.publish_seconds.observe(publish_s)
        alerts = sum(f.anomaly for f in result.scored)
        m.frames.inc(len(result.scored))
        m.alerts.inc(alerts)
        for f in result.scored:
            if f.anomaly:
                m.camera_alerts.labels(camera=camera_label(m, f.meta.camera_id)).inc()
        for rej in result.rejected:
            m.dead_lettered.labels(reason=rej.reason).inc()
        self._misfit(batch)
        acked_ms = time.time() * 1000
        for f in result.scored:
            if f.meta.captured_at is not None:
                m.end_to_end_seconds.observe(max(0.0, (acked_ms - f.meta.captured_at) / 1000))
        self.stats.scored += len(result.scored)
        self.stats.alerts += alerts
        self.stats.dead_lettered += len(result.rejected)

    def _misfit(self, batch: DecodedBatch) -> None:
        """Counts frames that did not fit the model; warns on the first and then every MISFIT_LOG_S."""
        if batch.misfit is None or not batch.misfit.counts:
            return
        for reason, n in batch.misfit.counts.items():
            self.metrics.frames_resized.labels(reason=reason).inc(n)
        now = time.monotonic()
        if batch.misfit.serious and now - self._misfit_logged >= MISFIT_LOG_S:
            self._misfit_logged = now
            log.warning("%s (counted in ama_frames_resized_total)", batch.misfit.message("frames of a batch"))


def drift_monitor(settings, calibration: Calibration) -> DriftMonitor | None:
    """From the agent's `drift:` settings; None when drift watching is off."""
    d = settings.drift
    if not d.enabled:
        return None
    band = DriftBand(d.window, d.min_frames, d.mean_tolerance, tuple(d.std_ratio), d.alert_sigmas)
    return DriftMonitor(calibration, band, d.max_cameras)


class DriftWatch:
    """Rolling per-camera statistics of published z against the calibration that decided them."""

    def __init__(self, monitor: DriftMonitor | None, metrics: AgentMetrics):
        self.monitor = monitor
        self.metrics = metrics

    def observe(self, calibration: Calibration, result: ScoredBatch) -> None:
        drift = self.monitor
        if drift is None or not result.scored:
            return
        if drift.calibration_id != calibration.calibration_id:
            drift.reset(calibration)  # a new calibration: new expectations, empty windows
            for gauge in (self.metrics.drift, self.metrics.drift_z_mean, self.metrics.drift_alert_rate):
                gauge.clear()
        cameras = [f.meta.camera_id for f in result.scored]
        for state in drift.observe(cameras, [f.z for f in result.scored], [f.anomaly for f in result.scored]):
            _report(state, calibration)
        for camera in set(cameras):
            state = drift.cameras.get(camera)
            if state is not None and state.judged:
                label = camera or ""
                self.metrics.drift.labels(camera=label).set(int(state.drifting))
                self.metrics.drift_z_mean.labels(camera=label).set(state.z_mean)
                self.metrics.drift_alert_rate.labels(camera=label).set(state.alert_rate)


def _report(state: CameraDrift, calibration: Calibration) -> None:
    camera = state.camera if state.camera is not None else "(no camera id)"
    if state.drifting:
        log.warning("camera %s: scores drifted from calibration %s (%s); recalibration is due: run "
                    "`ama-stream calibrate` on recent known-normal frames of this camera",
                    camera, calibration.calibration_id, "; ".join(state.reasons))
    else:
        log.info("camera %s: scores back within the band of calibration %s", camera, calibration.calibration_id)
