"""Streaming statistics of R-scores: Welford mean/variance in float64 and a bounded reservoir sample.

Calibration reads any number of frames in one pass: the moments are exact whatever the count,
and the reservoir keeps a uniform random sample of at most `capacity` scores for the empirical
quantiles and conformal p-values (memory stays bounded; resolution is discussed in
docs/operations.md).
"""
from __future__ import annotations

import math

import numpy as np


class RunningStats:
    """Count, mean and population variance (Welford / Chan's batch merge) plus a reservoir sample."""

    def __init__(self, capacity: int, seed: int | list[int] = 0):
        if capacity < 2:
            raise ValueError(f"the sample capacity must be at least 2, got {capacity}")
        self.capacity = int(capacity)
        self.n = 0
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean
        self._sample = np.empty(self.capacity, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def update(self, values: np.ndarray) -> None:
        """Adds finite float values (callers drop non-finite ones first)."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        # Chan et al.'s merge of (n, mean, M2) with the batch's own: stable for large offsets
        n_b = x.size
        mean_b = float(x.mean())
        m2_b = float(np.square(x - mean_b).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * self.n * n_b / n
        self._reservoir(x)
        self.n = n

    def _reservoir(self, x: np.ndarray) -> None:
        """Algorithm R: after t values each one is in the sample with probability capacity / t."""
        filled = min(self.n, self.capacity)
        take = min(self.capacity - filled, x.size)
        self._sample[filled : filled + take] = x[:take]
        rest = x[take:]
        if rest.size == 0:
            return
        seen = self.n + take + np.arange(rest.size)  # 0-based position of each value in the stream
        slots = self._rng.integers(0, seen + 1)
        for i in np.flatnonzero(slots < self.capacity):  # in stream order: a later value may evict an earlier one
            self._sample[slots[i]] = rest[i]

    @property
    def variance(self) -> float:
        return self._m2 / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation (the Gaussian MLE, as the trainer fits it)."""
        return math.sqrt(self.variance) if self.n else math.nan

    def sample(self) -> np.ndarray:
        """The reservoir, sorted (a copy): min(n, capacity) scores."""
        return np.sort(self._sample[: min(self.n, self.capacity)])
