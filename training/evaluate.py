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

from ama_stream.calibration import Calibration, Policy, fit_calibration
from ama_stream.preprocess import to_tensor
from ama_stream.scoring import Scorer


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
        "recall_checkpoint": float(predicted_a[~normal].mean()),  # anomalies the checkpoint's own rule flags
        "n_normal": n_normal,
        "n_anomaly": n_anomaly,
        "calibration_id": calibration.calibration_id,
    }


def good_only_metrics(scorer: Scorer, images: np.ndarray, r: np.ndarray, calibration: Calibration,
                      batch_size: int = 256) -> dict:
    """What held-out normal images tell without any anomaly: how often the checkpoint's rule would
    raise a false alarm on them, the spread of their R-scores against the training fit, and how
    well they are reconstructed (mean |x - G(E(x))| in [0, 2] units)."""
    if len(r) == 0:
        return {}
    d = calibration.decide(r)
    inputs = scorer.tile(images).tiles  # every model input: the images, or a patch model's patches
    l1 = [float((scorer.reconstruct(x) - x).abs().mean(dim=(1, 2, 3)).sum())
          for x in (to_tensor(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size))]
    q = np.quantile(r, [0.01, 0.5, 0.99])
    return {
        "holdout_n": int(len(r)),
        "holdout_far_checkpoint": float(d.anomaly.mean()),
        "holdout_r_mean": float(np.mean(r)),
        "holdout_r_std": float(np.std(r)),
        "holdout_r_p01": float(q[0]), "holdout_r_p50": float(q[1]), "holdout_r_p99": float(q[2]),
        "holdout_z_mean": float(np.mean(d.z)),
        "holdout_z_std": float(np.std(d.z)),
        "holdout_recon_l1": sum(l1) / len(inputs),
    }


OPERATING_FPRS = (0.01, 0.001)  # the false-alarm rates users run at
OPERATING_POLICIES = ("upper", "two-sided")


def operating_points(r: np.ndarray, labels: np.ndarray, model_id: str = "", seed: int = 0,
                     fprs=OPERATING_FPRS, policies=OPERATING_POLICIES) -> dict:
    """Recall and measured false-alarm rate at thresholds fitted on held-out normal frames, as
    `ama-stream calibrate` fits them: the normal test images are split into two seeded halves, one
    fits the calibration (policy, target FPR), the other half and every anomaly are decided by it.

    Keys: recall_<policy>@<fpr> (share of anomalies that alert) and far_<policy>@<fpr> (share of the
    unseen normal half that alerts: it should be near the target).
    """
    labels = np.asarray(labels).astype(int)
    normal = np.flatnonzero(labels == 0)
    order = np.random.default_rng(seed).permutation(normal)
    fit_idx, held_normal = order[: len(order) // 2], order[len(order) // 2:]
    anomalies = np.flatnonzero(labels == 1)
    out: dict = {"operating_fit_normal": int(fit_idx.size), "operating_eval_normal": int(held_normal.size)}
    if fit_idx.size < 2 or held_normal.size == 0 or anomalies.size == 0:
        return out
    for policy in policies:
        for fpr in fprs:
            calibration = fit_calibration(r[fit_idx], model_id, Policy(policy, fpr))
            out[f"recall_{policy}@{fpr:g}"] = float(calibration.decide(r[anomalies]).anomaly.mean())
            out[f"far_{policy}@{fpr:g}"] = float(calibration.decide(r[held_normal]).anomaly.mean())
    return out


def full_metrics(r: np.ndarray, labels: np.ndarray, calibration: Calibration, seed: int = 0) -> dict:
    """detection_metrics plus the operating points: what `evaluate` and the trainer report."""
    return {**detection_metrics(r, labels, calibration), **operating_points(r, labels, calibration.model_id, seed)}


def human_table(metrics: dict, score_label: str = "R-score") -> str:
    """A short table for a person (stderr), beside the JSON line for scripts (stdout). The recall rows
    use thresholds fitted on held-out normals: two-sided |z| for the A-score, upper z for R."""
    lines = []
    if "auroc_a" in metrics:
        w = max(10, len(score_label) + 2)  # the score column fits its name (R-score, Mahalanobis distance)
        lines.append(f"{'':32}{'A-score':>10}{score_label:>{w}}")
        for label, key in (("AUROC", "auroc"), ("AUPR", "aupr")):
            lines.append(f"{label:32}{metrics[key + '_a']:>10.4f}{metrics[key + '_r']:>{w}.4f}")
        for fpr in OPERATING_FPRS:
            a, r = metrics.get(f"recall_two-sided@{fpr:g}"), metrics.get(f"recall_upper@{fpr:g}")
            if a is not None and r is not None:
                lines.append(f"{f'recall at {fpr:g} false-alarm rate':32}{a:>10.4f}{r:>{w}.4f}")
        lines.append(f"test images: {metrics['n_normal']} normal, {metrics['n_anomaly']} anomalies")
    if "holdout_n" in metrics:
        lines.append(f"held-out normal images: {metrics['holdout_n']}; false alarms at the checkpoint's |z| > 3: "
                     f"{metrics['holdout_far_checkpoint']:.4f}; {score_label} median {metrics['holdout_r_p50']:.4g} "
                     f"(1%-99%: {metrics['holdout_r_p01']:.4g}-{metrics['holdout_r_p99']:.4g}); "
                     f"mean |x - G(E(x))| {metrics['holdout_recon_l1']:.4f}")
    return "\n".join(lines)
