"""Policies and the per-entry decision rule: R-scores -> z, log A, p-value and the anomaly flag."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CALIBRATION_FORMAT = "ama-stream/calibration"
CALIBRATION_VERSION = 1
POLICIES = ("two-sided", "upper", "sigma")
DEFAULT_POLICY = "two-sided"
DEFAULT_TARGET_FPR = 0.001
DEFAULT_K = 3.0
DEFAULT_MAX_SAMPLE = 20_000
DEFAULT_MIN_CAMERA_FRAMES = 100
STABLE_TAIL_COUNT = 10  # a quantile threshold wants about this many sample scores beyond it
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class CalibrationError(ValueError):
    """A calibration that cannot be used (corrupt, for another model, invalid statistics)."""


@dataclass(frozen=True)
class Decisions:
    z: np.ndarray
    log_a: np.ndarray
    p_value: np.ndarray
    anomaly: np.ndarray  # bool
    threshold: np.ndarray  # the threshold in force for each frame, on the policy's statistic (|z| or z)


def gaussian_z_log_a(r: np.ndarray, mu: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    z = (np.asarray(r, dtype=np.float64) - mu) / sigma
    return z, -0.5 * z * z - math.log(sigma) - LOG_SQRT_2PI


def is_number(v: Any) -> bool:
    """A JSON number (bool excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_erfc = np.frompyfunc(math.erfc, 1, 1)


def gaussian_two_sided_p(z: np.ndarray) -> np.ndarray:
    """P(|Z| >= |z|) for a standard normal Z."""
    return _erfc(np.abs(np.asarray(z, dtype=np.float64)) / math.sqrt(2.0)).astype(np.float64)


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    name: str = DEFAULT_POLICY
    target_fpr: float | None = DEFAULT_TARGET_FPR  # two-sided / upper
    k: float | None = None  # sigma

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise CalibrationError(f"unknown policy {self.name!r}; use one of {', '.join(POLICIES)}")
        if self.name == "sigma":
            if not is_number(self.k) or not (math.isfinite(self.k) and self.k > 0):
                raise CalibrationError(f"policy sigma needs k > 0, got {self.k!r}")
            if self.target_fpr is not None:
                raise CalibrationError("policy sigma takes k, not target_fpr")
        else:
            if not is_number(self.target_fpr) or not 0.0 < self.target_fpr < 1.0:
                raise CalibrationError(f"policy {self.name} needs target_fpr in (0, 1), got {self.target_fpr!r}")
            if self.k is not None:
                raise CalibrationError(f"policy {self.name} takes target_fpr, not k")

    @classmethod
    def make(cls, name: str = DEFAULT_POLICY, target_fpr: float | None = None, k: float | None = None) -> "Policy":
        """A policy from command-line style options: the unused one may be left None."""
        if name == "sigma":
            return cls(name, None, DEFAULT_K if k is None else float(k))
        return cls(name, DEFAULT_TARGET_FPR if target_fpr is None else float(target_fpr), None)

    def statistic(self, z: np.ndarray) -> np.ndarray:
        return z if self.name == "upper" else np.abs(z)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k} if self.name == "sigma" else {"name": self.name, "target_fpr": self.target_fpr}

    def describe(self) -> str:
        if self.name == "sigma":
            return f"sigma: alert when |z| > {self.k:g}"
        side = "|z|" if self.name == "two-sided" else "z"
        return f"{self.name}: alert when {side} exceeds its empirical {1 - self.target_fpr:.6g} quantile"


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """The statistics of one camera (or of all): mu, sigma, n and a sorted sample of the R-scores."""

    n: int
    mu: float
    sigma: float
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0))  # sorted; empty: Gaussian model only

    def __post_init__(self) -> None:
        if not (is_number(self.mu) and math.isfinite(self.mu)):
            raise CalibrationError(f"mu must be a finite number, got {self.mu!r}")
        if not (is_number(self.sigma) and math.isfinite(self.sigma) and self.sigma > 0):
            raise CalibrationError(f"sigma must be a finite number > 0, got {self.sigma!r}")


class Rule:
    """An entry compiled under a policy: the threshold and the sorted calibration statistics."""

    def __init__(self, entry: Entry, policy: Policy):
        self.entry = entry
        self.policy = policy
        s = policy.statistic((entry.sample - entry.mu) / entry.sigma) if entry.sample.size else None
        self.scores: np.ndarray | None = None if s is None else np.sort(s)
        self.threshold, self.expected_fpr = self._threshold()

    @property
    def m(self) -> int:
        return 0 if self.scores is None else int(self.scores.size)

    def _threshold(self) -> tuple[float, float]:
        if self.policy.name == "sigma":
            k = float(self.policy.k)
            if self.scores is None:  # the Gaussian's own false-alarm rate
                return k, float(math.erfc(k / math.sqrt(2.0)))
            return k, float(np.mean(self.scores > k))
        if self.scores is None:
            raise CalibrationError(f"policy {self.policy.name} needs calibration scores, the entry has none")
        m = self.m
        # q of m+1 exchangeable scores lie strictly above the threshold: P(alert | normal) = q / (m + 1)
        q = math.floor((m + 1) * self.policy.target_fpr)
        if q == 0:  # the target is finer than the sample resolves: alert beyond everything seen
            return float(self.scores[-1]), 1.0 / (m + 1)
        return float(self.scores[m - q]), q / (m + 1)

    def p_values(self, z: np.ndarray) -> np.ndarray:
        if self.scores is None:
            return gaussian_two_sided_p(z)
        s = self.policy.statistic(z)
        at_least = self.m - np.searchsorted(self.scores, s, side="left")
        p = (1.0 + at_least) / (self.m + 1.0)
        return np.where(np.isfinite(s), p, np.nan)

    def alert_r_bounds(self) -> tuple[float | None, float]:
        """R below the first / above the second alerts (None: no lower bound)."""
        mu, sigma, t = self.entry.mu, self.entry.sigma, self.threshold
        return (None if self.policy.name == "upper" else mu - t * sigma), mu + t * sigma

    def warning(self, label: str) -> str | None:
        """Why this threshold is shaky, or None."""
        if self.policy.name == "sigma" or self.scores is None:
            return None
        fpr = self.policy.target_fpr
        wanted = math.ceil(STABLE_TAIL_COUNT / fpr)
        if self.m >= wanted:
            return None
        capped = f" (a sample of {self.m} of {self.entry.n} scores)" if self.entry.n > self.m else ""
        return (f"{label}: {self.m} calibration scores{capped} for target FPR {fpr:g}; about {wanted} are needed "
                f"for a stable threshold (expected false-alarm rate {self.expected_fpr:.3g})")
