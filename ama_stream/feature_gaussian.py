"""The Mahalanobis score: R's feature difference measured against what good images do.

R is the L1 norm of d = f(x, x) - f(x, G(E(x))), the critic's pooled features of the two pairs
(paper eq. 5). L1 weighs every feature channel alike, however much it varies on good images. A
checkpoint trained with `score: mahalanobis` also carries a Gaussian of d fitted on good images
(mean and a Ledoit-Wolf shrunk precision matrix, [W] and [W, W]), and its score is the Mahalanobis
distance sqrt((d - mean)^T P (d - mean)) instead of R: a channel that swings on good images counts
for little, one that never moves counts for much. Chosen on validation sets (docs/results.md,
"Which score generalises"). Whole-image models only: patch models score per-position maps.
"""
from __future__ import annotations

import numpy as np
import torch

KEYS = ("mean", "precision")
# measured on the Fashion-MNIST preset (docs/benchmarks.md): INT8 features lose the precision the
# whitened distance needs in the critic's quiet directions
INT8_REFUSED = ("INT8 quantization is refused for a model with score mahalanobis: its distance amplifies the "
                "quantization error (measured AUROC 0.69 against 0.98 in float32); export float32 instead")


def feature_difference(features):
    """Pooled features [2B, W] (first B rows (x, x), last B (x, x_hat); tensor or array) -> d [B, W]."""
    b = features.shape[0] // 2
    return features[:b] - features[b:]


def fit(d: np.ndarray) -> dict[str, torch.Tensor]:
    """The Gaussian of good images' feature differences d [B, W] (B >= 2)."""
    from sklearn.covariance import LedoitWolf  # loaded only where a model is fitted

    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or len(d) < 2:
        raise ValueError(f"fitting the feature Gaussian needs [B >= 2, W] differences, got {d.shape}")
    lw = LedoitWolf().fit(d)
    return {"mean": torch.from_numpy(lw.location_).float(), "precision": torch.from_numpy(lw.precision_).float()}


def mahalanobis(d: torch.Tensor, gaussian: dict[str, torch.Tensor]) -> torch.Tensor:
    """Vectors d [B, W] -> their Mahalanobis distance [B] under `gaussian` (float64: the unbounded
    critic's features reach 1e10, whose squares float32 holds but sums lose)."""
    d = d.double() - gaussian["mean"].to(d.device, torch.float64)
    precision = gaussian["precision"].to(d.device, torch.float64)
    return torch.einsum("bi,ij,bj->b", d, precision, d).clamp_min(0).sqrt()


def distance(features: torch.Tensor, gaussian: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pooled features [2B, W] -> the model's score [B]: the Mahalanobis distance of d."""
    return mahalanobis(feature_difference(features), gaussian)


def check(gaussian, width: int) -> dict[str, torch.Tensor]:
    """A checkpoint's feature Gaussian, validated: finite mean [W], symmetric positive definite precision [W, W]."""
    if not isinstance(gaussian, dict) or set(gaussian) != set(KEYS) or not all(
            isinstance(gaussian[k], torch.Tensor) for k in KEYS):
        raise ValueError(f"feature_gaussian must hold the tensors {', '.join(KEYS)}")
    mean, precision = gaussian["mean"].float(), gaussian["precision"].float()
    if tuple(mean.shape) != (width,) or tuple(precision.shape) != (width, width):
        raise ValueError(f"feature_gaussian shapes {tuple(mean.shape)} / {tuple(precision.shape)} do not match the "
                         f"critic's {width} features")
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(precision).all())):
        raise ValueError("feature_gaussian holds non-finite values")
    if not torch.allclose(precision, precision.T, rtol=1e-4, atol=1e-6 * float(precision.abs().max())):
        raise ValueError("feature_gaussian precision is not symmetric")
    eigenvalues = torch.linalg.eigvalsh(precision.double())
    if float(eigenvalues.min()) <= 0:  # else some feature differences would score 0 or an imaginary distance
        raise ValueError("feature_gaussian precision is not positive definite")
    return {"mean": mean, "precision": precision}
