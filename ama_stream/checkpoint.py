"""The checkpoint: one self-describing file that rebuilds the model without the training code.

Layout (a plain dict saved with torch.save, loaded with weights_only=True so nothing but
tensors and primitive containers is ever unpickled):

    format       "ama-stream/checkpoint"
    version      CHECKPOINT_VERSION
    model        ModelConfig as a dict (constructor arguments)
    preprocess   PreprocessSpec as a dict
    state_dict   weights of encoder/generator/discriminator (AMA module)
    rscore       {"mu", "sigma", "n"}: Gaussian of the training R-scores (MLE)
    train_config the training configuration as plain data
    metrics      whatever the trainer measured (plain data)
    created_at   ISO-8601 UTC
    resume       optional: optimiser/scheduler/RNG state and counters to continue training
    position_stats  optional (a patch model for aligned parts): per patch position, mean and std of
                 the good images' patch R-scores (`patch_mean`/`patch_std` [rows, cols]) and, per pixel
                 of the working size, of their anomaly maps (`map_mean`/`map_std` [height, width])
    feature_gaussian  optional (`score: mahalanobis`): `mean` [W] and `precision` [W, W] of the critic
                 feature difference on good images; the model's score is then the Mahalanobis distance
                 (ama_stream.feature_gaussian), and mu/sigma are of that distance
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import feature_gaussian as fgauss
from .fileio import atomic_write_bytes, read_file_bytes
from .model import AMA, ModelConfig
from .preprocess import PreprocessSpec

CHECKPOINT_FORMAT = "ama-stream/checkpoint"
CHECKPOINT_VERSION = 1
# far above any model this project trains (the default one, with its optimiser state for resuming,
# is tens of MB); a bound on what one read may take, since a path can come from a control message
MAX_CHECKPOINT_BYTES = 2 * 2**30


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or of an unsupported version."""


@dataclass
class Checkpoint:
    model: ModelConfig
    preprocess: PreprocessSpec
    state_dict: dict[str, torch.Tensor]
    mu: float
    sigma: float
    n_train: int = 0
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created_at: str = ""
    resume: dict | None = None
    position_stats: dict[str, torch.Tensor] | None = None  # see the module docstring
    feature_gaussian: dict[str, torch.Tensor] | None = None  # see the module docstring
    model_id: str = ""  # weights_id(): set on load and save

    def build_model(self, device: str | torch.device = "cpu") -> AMA:
        """The AMA module with these weights, on `device`, in eval mode."""
        model = AMA(self.model)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"weights do not match the model configuration: {exc}") from None
        return model.to(device).eval()

    def to_payload(self) -> dict[str, Any]:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self.model.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "rscore": {"mu": float(self.mu), "sigma": float(self.sigma), "n": int(self.n_train)},
            "train_config": self.train_config,
            "metrics": self.metrics,
            "created_at": self.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.resume is not None:
            payload["resume"] = self.resume
        if self.position_stats is not None:
            payload["position_stats"] = {k: v.detach().cpu().float() for k, v in self.position_stats.items()}
        if self.feature_gaussian is not None:
            payload["feature_gaussian"] = {k: v.detach().cpu().float() for k, v in self.feature_gaussian.items()}
        return payload

    @property
    def score_name(self) -> str:
        """What the model's score is: "R" or "Mahalanobis" (the feature Gaussian's distance)."""
        return "R" if self.feature_gaussian is None else "Mahalanobis"

    @property
    def score_label(self) -> str:
        """How plots and tables name the model's score for a person."""
        return "R-score" if self.feature_gaussian is None else "Mahalanobis distance"


def weights_id(model: ModelConfig, spec: PreprocessSpec, state_dict: dict[str, torch.Tensor],
               position_stats: dict[str, torch.Tensor] | None = None,
               feature_gaussian: dict[str, torch.Tensor] | None = None) -> str:
    """Identity of what scores frames: architecture, preprocessing, weights (and per-position statistics,
    the feature Gaussian).

    Metrics or resume state may change without changing it, so calibrations stay valid.
    """
    h = hashlib.sha256()
    h.update(repr(sorted(model.to_dict().items())).encode())
    h.update(repr(sorted(spec.to_dict().items())).encode())
    tensors = {**state_dict, **{f"position_stats.{k}": v for k, v in (position_stats or {}).items()},
               **{f"feature_gaussian.{k}": v for k, v in (feature_gaussian or {}).items()}}
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> str:
    """Writes atomically (temp file + rename); returns and sets the model id."""
    buf = io.BytesIO()
    torch.save(ckpt.to_payload(), buf)
    atomic_write_bytes(path, buf.getvalue())
    ckpt.model_id = ckpt_id(ckpt)
    return ckpt.model_id


def ckpt_id(ckpt: Checkpoint) -> str:
    return weights_id(ckpt.model, ckpt.preprocess, ckpt.state_dict, ckpt.position_stats, ckpt.feature_gaussian)


def _require(payload: dict, key: str, kind: type | tuple[type, ...], path: Path):
    if key not in payload:
        raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    value = payload[key]
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: checkpoint field '{key}' has the wrong type ({type(value).__name__})")
    return value


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads and validates a checkpoint; tensors land on the CPU whatever device saved them."""
    path = Path(path)
    data = read_file_bytes(path, "checkpoint", CheckpointError, MAX_CHECKPOINT_BYTES)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling refused"
        raise CheckpointError(f"{path}: not a safe ama-stream checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated: {type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an ama-stream checkpoint (missing format marker)")
    version = payload.get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is not supported (expected {CHECKPOINT_VERSION})")
    try:
        model_cfg = ModelConfig.from_dict(_require(payload, "model", dict, path))
        spec = PreprocessSpec.from_dict(_require(payload, "preprocess", dict, path))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model/preprocess configuration: {exc}") from None
    state = _require(payload, "state_dict", dict, path)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict holds non-tensor values")
    rscore = _require(payload, "rscore", dict, path)
    mu, sigma = rscore.get("mu"), rscore.get("sigma")
    if not isinstance(mu, (int, float)) or not isinstance(sigma, (int, float)) or not math.isfinite(mu) or not (
        math.isfinite(sigma) and sigma > 0
    ):
        raise CheckpointError(f"{path}: invalid R-score statistics mu={mu!r} sigma={sigma!r}")
    positions = _position_stats(payload.get("position_stats"), spec, path)
    gaussian = payload.get("feature_gaussian")
    if gaussian is not None:
        if spec.patched:
            raise CheckpointError(f"{path}: a feature Gaussian (score mahalanobis) belongs to whole-image models, "
                                  "not to a patch model")
        try:
            gaussian = fgauss.check(gaussian, model_cfg.disc_width)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    ckpt = Checkpoint(
        model=model_cfg,
        preprocess=spec,
        state_dict=state,
        mu=float(mu),
        sigma=float(sigma),
        n_train=int(rscore.get("n", 0)),
        train_config=payload.get("train_config") or {},
        metrics=payload.get("metrics") or {},
        created_at=str(payload.get("created_at", "")),
        resume=payload.get("resume"),
        position_stats=positions,
        feature_gaussian=gaussian,
    )
    ckpt.model_id = ckpt_id(ckpt)
    return ckpt


POSITION_KEYS = ("patch_mean", "patch_std", "map_mean", "map_std")


def _position_stats(stats, spec: PreprocessSpec, path: Path) -> dict[str, torch.Tensor] | None:
    """The optional per-position statistics, checked: four finite 2-D tensors, positive stds, and a
    working size (frame_size) for the maps' to refer to."""
    if stats is None:
        return None
    if not isinstance(stats, dict) or set(stats) != set(POSITION_KEYS) or not all(
            isinstance(v, torch.Tensor) and v.dim() == 2 for v in stats.values()):
        raise CheckpointError(f"{path}: position_stats must hold the 2-D tensors {', '.join(POSITION_KEYS)}")
    if not spec.frame_size or tuple(stats["map_mean"].shape) != spec.frame_size:
        raise CheckpointError(f"{path}: position_stats maps of {tuple(stats['map_mean'].shape)} do not match the "
                              f"working size {spec.frame_size}")
    for mean, std in (("patch_mean", "patch_std"), ("map_mean", "map_std")):
        if stats[mean].shape != stats[std].shape or not bool(torch.isfinite(stats[mean]).all()) or not bool(
                (torch.isfinite(stats[std]) & (stats[std] > 0)).all()):
            raise CheckpointError(f"{path}: position_stats {mean}/{std} are not finite with positive stds of one shape")
    return {k: stats[k].float() for k in POSITION_KEYS}
