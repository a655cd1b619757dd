"""Evaluation as in the paper (section 4): AUROC/AUPR for the R-score and the A-score, plus F1
and the false-alarm rate at the calibrated threshold (the decision rule of
ama_stream.calibration, i.e. exactly what the agent would alert on).

Anomaly = positive class. The R-score ranks by R (high = anomalous). The A-score is the
two-sided Gaussian density of R (eq. 6): low density = anomalous, so it ranks by -log A,
which is monotone in |z| and catches unusually LOW R too.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from ama_stream.calibration import Calibration
from ama_stream.preprocess import to_tensor
from ama_stream.scoring import Scorer


def r_scores(scorer: Scorer, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """R-scores of uint8 [N, S, S, C] images already fitted to the model size."""
    out = [scorer.score_tensor(to_tensor(images[i : i + batch_size])).r for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


def fit_gaussian(r: np.ndarray) -> tuple[float, float]:
    """MLE of a Gaussian (mean, population std), in float64."""
    r = np.asarray(r, dtype=np.float64)
    if r.size < 2:
        raise ValueError(f"need at least 2 R-scores to fit mu/sigma, got {r.size}")
    mu, sigma = float(r.mean()), float(r.std())
    if not np.isfinite(mu) or not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"R-scores give a degenerate Gaussian (mu={mu}, sigma={sigma}); the model may have collapsed")
    return mu, sigma


def detection_metrics(r: np.ndarray, labels: np.ndarray, calibration: Calibration) -> dict:
    """Metrics for R and A scores of a labelled test set (labels: 1 = anomaly, 0 = normal)."""
    labels = np.asarray(labels).astype(int)
    n_anomaly, n_normal = int(labels.sum()), int((labels == 0).sum())
    if n_anomaly == 0 or n_normal == 0:
        raise ValueError(f"need both normal and anomalous test images (normal={n_normal}, anomaly={n_anomaly})")
    decisions = calibration.decide(r)
    a_score = -decisions.log_a  # low density = anomalous
    predicted_a = decisions.anomaly.astype(int)
    normal = labels == 0
    return {
        "auroc_a": float(roc_auc_score(labels, a_score)),
        "auroc_r": float(roc_auc_score(labels, r)),
        "aupr_a": float(average_precision_score(labels, a_score)),
        "aupr_r": float(average_precision_score(labels, r)),
        "f1_a": float(f1_score(labels, predicted_a, zero_division=0)),
        "far_a": float(predicted_a[normal].mean()),
        "n_normal": n_normal,
        "n_anomaly": n_anomaly,
        "calibration_id": calibration.calibration_id,
    }


def evaluate_scorer(scorer: Scorer, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> dict:
    r = r_scores(scorer, images, batch_size)
    return detection_metrics(r, labels, Calibration.from_checkpoint(scorer.checkpoint))
