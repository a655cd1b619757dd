"""Fitting a calibration: R-scores of known-normal frames (with their camera ids) streamed into
global and per-camera statistics."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..streamstats import RunningStats
from .artifact import Calibration
from .policy import DEFAULT_MAX_SAMPLE, DEFAULT_MIN_CAMERA_FRAMES, CalibrationError, Entry, Policy


class CalibrationFitter:
    """Streams R-scores (with their camera ids) into global and per-camera statistics."""

    def __init__(self, per_camera: bool = False, max_sample: int = DEFAULT_MAX_SAMPLE, seed: int = 0):
        self.per_camera = per_camera
        self.max_sample = max_sample
        self.seed = seed
        self.global_stats = RunningStats(max_sample, seed)
        self.camera_stats: dict[str, RunningStats] = {}
        self.skipped_nonfinite = 0

    def update(self, r: np.ndarray, camera_ids: Sequence[str | None] | None = None) -> None:
        r = np.asarray(r, dtype=np.float64).reshape(-1)
        if camera_ids is not None and len(camera_ids) != r.size:
            raise ValueError(f"{len(camera_ids)} camera ids for {r.size} scores")
        finite = np.isfinite(r)
        self.skipped_nonfinite += int((~finite).sum())
        self.global_stats.update(r[finite])
        if not self.per_camera or camera_ids is None:
            return
        by_camera: dict[str, list[int]] = {}
        for i in np.flatnonzero(finite):
            if camera_ids[i] is not None:
                by_camera.setdefault(camera_ids[i], []).append(int(i))
        for camera, idx in by_camera.items():
            if camera not in self.camera_stats:
                self.camera_stats[camera] = RunningStats(self.max_sample, [self.seed, len(self.camera_stats) + 1])
            self.camera_stats[camera].update(r[idx])

    @property
    def n(self) -> int:
        return self.global_stats.n

    def finish(self, model_id: str, policy: Policy, source: Mapping[str, Any],
               min_camera_frames: int = DEFAULT_MIN_CAMERA_FRAMES) -> tuple[Calibration, list[str]]:
        """The calibration, and notes on cameras left to the global entry."""
        notes: list[str] = []
        global_entry = _entry_from(self.global_stats, "the calibration data")
        cameras: dict[str, Entry] = {}
        for camera, stats in sorted(self.camera_stats.items()):
            if stats.n < min_camera_frames:
                notes.append(f"camera {camera!r}: only {stats.n} frames (< {min_camera_frames}); it uses the global entry")
                continue
            try:
                cameras[camera] = _entry_from(stats, f"camera {camera!r}")
            except CalibrationError as exc:
                notes.append(f"{exc}; it uses the global entry")
        source = {**source, "frames": self.n, "skipped_nonfinite": self.skipped_nonfinite}
        return Calibration(model_id, global_entry, policy, cameras, source=source), notes


def fit_calibration(r: np.ndarray, model_id: str, policy: Policy = Policy(),
                    source: Mapping[str, Any] | None = None, max_sample: int = DEFAULT_MAX_SAMPLE,
                    seed: int = 0) -> Calibration:
    """The calibration of R-scores of known-normal images in one call (what `ama-stream calibrate` fits).

    >>> cal = fit_calibration(scorer.score_images(good_images).r, scorer.model_id, Policy("upper", 0.01))
    >>> cal.decide(scorer.score_images(new_images).r).anomaly
    """
    fitter = CalibrationFitter(max_sample=max_sample, seed=seed)
    fitter.update(r)
    calibration, _ = fitter.finish(model_id, policy, dict(source or {"spec": "fit_calibration"}))
    return calibration


def _entry_from(stats: RunningStats, what: str) -> Entry:
    if stats.n < 2:
        raise CalibrationError(f"{what}: need at least 2 finite R-scores to calibrate, got {stats.n}")
    if not stats.std > 0:
        raise CalibrationError(f"{what}: all {stats.n} R-scores are equal ({stats.mean:g}); sigma would be 0 "
                               "(a collapsed model or identical frames)")
    return Entry(n=stats.n, mu=stats.mean, sigma=stats.std, sample=stats.sample())
