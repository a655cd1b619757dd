"""Drift of the live scores away from their calibration, per camera. No Kafka here.

For every camera the monitor keeps the z of its last `window` frames judged normal and the
anomaly flags of its last `window` frames, and compares them with what the calibration in
force implies for normal data:

- mean z of normal-judged frames: the calibration sample's own mean z below the threshold
  (0 for a symmetric Gaussian); out of band when it moves by more than `mean_tolerance` (z units,
  i.e. that fraction of the calibration sigma): the scores' location has shifted;
- spread of z of normal-judged frames: out of band when its ratio to the calibration's leaves
  `std_ratio`: frames got noisier or more uniform than when calibrated (only frames below the
  threshold count, so broadening shows here only up to a point; beyond it the alert rate rises);
- alert rate: out of band when the alerts in the window exceed the binomial upper bound
  n q + alert_sigmas sqrt(n q (1 - q)) + 1 for the expected false-alarm rate q: either a run of real
  anomalies or a shift that the mean test has not yet caught.

A camera is judged once it has `min_frames` frames (the z tests: `min_frames` judged normal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .calibration import Calibration, Rule


@dataclass(frozen=True)
class DriftBand:
    window: int = 1000
    min_frames: int = 200
    mean_tolerance: float = 0.5
    std_ratio: tuple[float, float] = (0.75, 1.33)
    alert_sigmas: float = 4.0

    def __post_init__(self) -> None:
        if self.window < 2 or not 1 <= self.min_frames <= self.window:
            raise ValueError(f"drift window {self.window} / min_frames {self.min_frames}: need 1 <= min_frames <= window")
        low, high = self.std_ratio
        if not (0 < low < 1 < high) or self.mean_tolerance <= 0 or self.alert_sigmas <= 0:
            raise ValueError("drift band: need mean_tolerance > 0, alert_sigmas > 0 and std_ratio (low < 1 < high)")


@dataclass(frozen=True)
class Expectation:
    """What normal frames look like under a rule."""

    z_mean: float  # of the frames the rule judges normal
    z_std: float
    alert_rate: float

    @classmethod
    def of(cls, rule: Rule) -> "Expectation":
        if rule.scores is not None:
            z = (rule.entry.sample - rule.entry.mu) / rule.entry.sigma
            normal = z[rule.policy.statistic(z) <= rule.threshold]
            if normal.size >= 2:
                return cls(float(normal.mean()), float(normal.std()), rule.expected_fpr)
        # no sample (the checkpoint's Gaussian, |z| <= k): a standard normal truncated to [-k, k]
        k = rule.threshold
        inside = math.erf(k / math.sqrt(2.0))
        density = math.exp(-0.5 * k * k) / math.sqrt(2.0 * math.pi)
        return cls(0.0, math.sqrt(max(1e-12, 1.0 - 2.0 * k * density / inside)), rule.expected_fpr)


class _Ring:
    """The last `size` values of a stream."""

    def __init__(self, size: int):
        self.values = np.zeros(size)
        self.count = 0  # values seen, capped at size for reading

    def extend(self, values: np.ndarray) -> None:
        values = values[-self.values.size :]
        start = self.count % self.values.size
        first = min(values.size, self.values.size - start)
        self.values[start : start + first] = values[:first]
        self.values[: values.size - first] = values[first:]
        self.count += values.size

    def view(self) -> np.ndarray:
        return self.values[: min(self.count, self.values.size)]


@dataclass
class CameraDrift:
    """A camera's rolling statistics and whether they left their band."""

    camera: str | None
    expected: Expectation
    band: DriftBand
    normal_z: _Ring = field(init=False)
    flags: _Ring = field(init=False)
    z_mean: float = math.nan
    z_std: float = math.nan
    alert_rate: float = math.nan
    drifting: bool = False
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.normal_z = _Ring(self.band.window)
        self.flags = _Ring(self.band.window)

    @property
    def judged(self) -> bool:
        """Enough frames for the alert-rate test (the z tests also need min_frames judged normal)."""
        return self.flags.count >= self.band.min_frames

    def update(self, z: np.ndarray, anomaly: np.ndarray) -> bool:
        """Adds one batch of this camera's frames; True when `drifting` changed."""
        self.normal_z.extend(z[~anomaly])
        self.flags.extend(anomaly.astype(np.float64))
        normal, flags = self.normal_z.view(), self.flags.view()
        if normal.size:
            self.z_mean, self.z_std = float(normal.mean()), float(normal.std())
        self.alert_rate = float(flags.mean()) if flags.size else math.nan
        if not self.judged:
            return False
        e, b = self.expected, self.band
        reasons = []
        if normal.size >= b.min_frames:  # a camera whose frames nearly all alert is caught by the rate test
            if abs(self.z_mean - e.z_mean) > b.mean_tolerance:
                reasons.append(f"mean z of normal frames {self.z_mean:+.2f}, expected {e.z_mean:+.2f} +- {b.mean_tolerance:g}")
            ratio = self.z_std / e.z_std if e.z_std > 0 else math.inf
            if not b.std_ratio[0] <= ratio <= b.std_ratio[1]:
                reasons.append(f"spread of z {self.z_std:.2f}, expected {e.z_std:.2f} "
                               f"(x{b.std_ratio[0]:g} .. x{b.std_ratio[1]:g})")
        n, q = flags.size, e.alert_rate
        limit = n * q + b.alert_sigmas * math.sqrt(n * q * (1 - q)) + 1
        if flags.sum() > limit:
            reasons.append(f"alert rate {self.alert_rate:.4f} over the last {n} frames, expected {q:.4f} "
                           f"(at most {limit / n:.4f})")
        was = self.drifting
        self.drifting, self.reasons = bool(reasons), tuple(reasons)
        return self.drifting != was


class DriftMonitor:
    """Per-camera drift against one calibration; `observe` once per scored batch."""

    def __init__(self, calibration: Calibration, band: DriftBand = DriftBand(), max_cameras: int = 1000):
        self.band = band
        self.max_cameras = max_cameras
        self.untracked = 0  # frames of cameras past max_cameras (counted, never remembered: ids are outsider input)
        self.reset(calibration)

    def reset(self, calibration: Calibration) -> None:
        """Starts over against a new calibration (its own expectations, empty windows)."""
        self.calibration_id = calibration.calibration_id
        self._calibration = calibration
        self.cameras: dict[str | None, CameraDrift] = {}
        self.untracked = 0

    def observe(self, camera_ids: Sequence[str | None], z: np.ndarray, anomaly: np.ndarray) -> list[CameraDrift]:
        """Adds a batch; returns the cameras whose drift state changed."""
        z, anomaly = np.asarray(z, dtype=np.float64), np.asarray(anomaly, dtype=bool)
        by_camera: dict[str | None, list[int]] = {}
        for i, camera in enumerate(camera_ids):
            by_camera.setdefault(camera, []).append(i)
        changed = []
        for camera, idx in by_camera.items():
            state = self.cameras.get(camera)
            if state is None:
                if len(self.cameras) >= self.max_cameras:
                    self.untracked += len(idx)
                    continue
                state = self.cameras[camera] = CameraDrift(camera, Expectation.of(self._calibration.rule(camera)), self.band)
            if state.update(z[idx], anomaly[idx]):
                changed.append(state)
        return changed
