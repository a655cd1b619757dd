"""Turning R-scores into decisions: z, log A, p-value, anomaly flag, under a calibration.

Minimal first version: the checkpoint's training (mu, sigma) and the classic two-sided rule
|z| > k (k = 3). The calibration artifact, label-free threshold policies, p-values, per-camera
entries and hot reload come with the calibration issue; the agent only uses this interface:

    cal = Calibration.from_checkpoint(checkpoint)        # or load_calibration(path, model_id)
    d = cal.decide(r_scores, camera_ids)                 # Decisions, arrays of length B
    cal.calibration_id                                   # carried by every record
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class CalibrationError(ValueError):
    """A calibration that cannot be used (corrupt, for another model, invalid statistics)."""


@dataclass(frozen=True)
class Decisions:
    z: np.ndarray
    log_a: np.ndarray
    p_value: np.ndarray
    anomaly: np.ndarray  # bool
    threshold: np.ndarray  # the threshold in force for each frame (|z| units for the sigma policy)


def gaussian_z_log_a(r: np.ndarray, mu: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    z = (np.asarray(r, dtype=np.float64) - mu) / sigma
    return z, -0.5 * z * z - math.log(sigma) - LOG_SQRT_2PI


@dataclass(frozen=True)
class Calibration:
    model_id: str
    mu: float
    sigma: float
    k: float = 3.0
    calibration_id: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and math.isfinite(self.sigma) and self.sigma > 0):
            raise CalibrationError(f"invalid calibration statistics mu={self.mu!r} sigma={self.sigma!r}")

    @classmethod
    def from_checkpoint(cls, checkpoint, k: float = 3.0) -> "Calibration":
        return cls(
            model_id=checkpoint.model_id,
            mu=checkpoint.mu,
            sigma=checkpoint.sigma,
            k=k,
            calibration_id=f"checkpoint:{checkpoint.model_id}",
        )

    def decide(self, r: np.ndarray, camera_ids: Sequence[str | None] | None = None) -> Decisions:
        z, log_a = gaussian_z_log_a(r, self.mu, self.sigma)
        # two-sided Gaussian tail probability of |Z| >= |z|
        p = np.array([math.erfc(abs(v) / math.sqrt(2.0)) for v in z], dtype=np.float64)
        return Decisions(z=z, log_a=log_a, p_value=p, anomaly=np.abs(z) > self.k, threshold=np.full(len(z), self.k))
