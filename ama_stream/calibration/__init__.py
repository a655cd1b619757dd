"""Turning R-scores into decisions (z, log A, p-value, anomaly flag) under a calibration. No Kafka here.

A calibration is fitted on known-normal frames (`ama-stream calibrate`) and kept apart from the
checkpoint, in a versioned JSON artifact tied to the model by `Checkpoint.model_id`:

    cal = load_calibration(path, scorer.model_id)   # or Calibration.from_checkpoint(checkpoint)
    d = cal.decide(r_scores, camera_ids)            # Decisions, arrays of length B
    cal.calibration_id                              # carried by every record

Each entry (the global one, and optionally one per camera) holds mu and sigma of the R-scores
(z = (R - mu) / sigma, log A = the Gaussian log density, paper eq. 6) and a sorted uniform sample
of the calibration R-scores. A policy turns z into a statistic s and alerts when s > threshold:

    two-sided  s = |z|   threshold = the empirical (1 - target_fpr) quantile of s on the sample
    upper      s = z     same, but only unusually HIGH R alerts
    sigma      s = |z|   threshold = k (the classic rule)

The p-value is conformal: p = (1 + #{sample s' >= s}) / (m + 1) over the m sample scores, so on
normal data it is uniform and, for the quantile policies, anomaly <=> p <= target_fpr exactly.
The checkpoint-only fallback has no sample: it is the paper's two-sided Gaussian, |z| > 3, with
the Gaussian two-sided tail as p-value.

Artifact (JSON, schema CALIBRATION_FORMAT / CALIBRATION_VERSION):

    format, version, calibration_id   "cal-" + sha256 of the canonical content (checked on load)
    model_id                          the checkpoint it belongs to (Checkpoint.model_id)
    created_at                        ISO-8601 UTC
    source                            where the scores came from ({"spec": ..., "frames": ...})
    policy                            {"name": "two-sided"|"upper", "target_fpr": F} or {"name": "sigma", "k": K}
    global                            entry
    cameras                           {camera id: entry}; unknown cameras use the global entry
    entry = {n, mu, sigma, threshold, expected_fpr, alert_r_below, alert_r_above, sample}
"""
from .artifact import PLAUSIBLE_SHIFT_Z, PLAUSIBLE_SPREAD, Calibration, content_id
from .fit import CalibrationFitter, fit_calibration
from .parse import MAX_CALIBRATION_BYTES, load_calibration, parse_calibration
from .policy import (CALIBRATION_FORMAT, CALIBRATION_VERSION, DEFAULT_K, DEFAULT_MAX_SAMPLE,
                     DEFAULT_MIN_CAMERA_FRAMES, DEFAULT_POLICY, DEFAULT_TARGET_FPR, POLICIES, STABLE_TAIL_COUNT,
                     CalibrationError, Decisions, Entry, Policy, Rule, gaussian_two_sided_p, gaussian_z_log_a)

__all__ = [
    "CALIBRATION_FORMAT", "CALIBRATION_VERSION", "DEFAULT_K", "DEFAULT_MAX_SAMPLE", "DEFAULT_MIN_CAMERA_FRAMES",
    "DEFAULT_POLICY", "DEFAULT_TARGET_FPR", "MAX_CALIBRATION_BYTES", "PLAUSIBLE_SHIFT_Z", "PLAUSIBLE_SPREAD", "POLICIES",
    "STABLE_TAIL_COUNT", "Calibration", "CalibrationError", "CalibrationFitter", "Decisions", "Entry", "Policy", "Rule",
    "content_id", "fit_calibration", "gaussian_two_sided_p", "gaussian_z_log_a", "load_calibration", "parse_calibration",
]
