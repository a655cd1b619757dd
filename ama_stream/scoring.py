"""Scorer: checkpoint -> R-score, z and log A-score for a batch of images. Knows nothing of Kafka.

R(x) = || f(x, x) - f(x, G(E(x))) ||_1 with f the critic's sum-pooled penultimate features
(paper eq. 5); both halves of the pair go through the critic in ONE pass over the 2B batch.
The A-score (eq. 6) is the Gaussian density of R under the fitted (mu, sigma); it is reported
as z = (R - mu) / sigma and log A, never as a raw density that underflows.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch.nn.utils import parametrize

from . import ops
from .checkpoint import Checkpoint, load_checkpoint
from .model import stacked_pairs
from .preprocess import FitTally, native_shape, prepare_batch, to_tensor
from .progress import progress

if TYPE_CHECKING:
    from .calibration import CalibrationFitter

log = logging.getLogger(__name__)

# Scorer precisions: None = no autocast.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Scores:
    """Per-image results, numpy float64 arrays of length B."""

    r: np.ndarray
    z: np.ndarray
    log_a: np.ndarray

    def __len__(self) -> int:
        return len(self.r)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> the first CUDA device when one is usable, else the CPU; validates 'cuda:N'."""
    if device is None or str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda:N")
    return dev


def _bake_spectral_norm(module: torch.nn.Module) -> None:
    """Replace spectral-norm parametrizations by their current (eval) value: same outputs, less work."""
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)


class Scorer:
    """Loads a checkpoint once; scores batches of images on one device.

    Speed options (each measured; docs/benchmarks.md has the numbers):
    - channels_last: NHWC activations. Default (None): on for the CPU, where it measured faster,
      off on CUDA until measured there.
    - precision: "float32" (default), or "bfloat16"/"float16" autocast for E, G and the critic; the
      fused tail reads the half-precision activation and accumulates in float32. On this project's
      CPUs (AVX2, no native bf16/fp16 math) autocast measured several times slower: meant for GPUs.
    - compile_mode: None (eager, default) or a torch.compile mode ("default", "reduce-overhead" =
      CUDA graphs, "max-autotune") for E, G and the critic. Shapes are static: each new batch size
      compiles again, so use it with fixed batch sizes.
    """

    def __init__(
        self,
        checkpoint: str | Checkpoint,
        device: str | torch.device | None = "auto",
        *,
        channels_last: bool | None = None,
        precision: str = "float32",
        compile_mode: str | None = None,
    ):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.device = resolve_device(device)
        self.channels_last = self.device.type == "cpu" if channels_last is None else bool(channels_last)
        self.precision = precision
        self.compile_mode = compile_mode
        self._memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model = self.checkpoint.build_model("cpu")
        with torch.no_grad():
            _bake_spectral_norm(model)
        self.model = model.to(self.device, memory_format=self._memory_format).eval()
        self.spec = self.checkpoint.preprocess
        self.mirrored = self.checkpoint.model.mirrored
        self.mu = self.checkpoint.mu
        self.sigma = self.checkpoint.sigma
        self._critic_map = self._critic_map_eager
        if compile_mode is not None:
            self._critic_map = torch.compile(self._critic_map_eager, mode=compile_mode, dynamic=False, fullgraph=True)
        log.debug(
            "scorer on %s: channels_last=%s precision=%s compile_mode=%s ops backend=%s",
            self.device, self.channels_last, precision, compile_mode, ops.backend(self.device),
        )

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    def prepare(self, images) -> torch.Tensor:
        """Decoded uint8 images (HxW or HxWxC, any size) -> CPU model input [B, C, S, S]."""
        return prepare_batch(images, self.spec)

    def _critic_map_eager(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.model.generator(self.model.encoder(x))
        return self.model.discriminator.feature_map(stacked_pairs(x, x_hat, self.mirrored))

    @torch.inference_mode()
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Critic activation h [2B, W, 8, 8] for the stacked pairs (x, x) and (x, G(E(x)))."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self._memory_format)
        dtype = AUTOCAST_DTYPES[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self._critic_map(x)

    @torch.inference_mode()
    def score_tensor(self, x: torch.Tensor, mu: float | None = None, sigma: float | None = None) -> Scores:
        """x [B, C, S, S] in [-1, 1] -> Scores under (mu, sigma), defaulting to the checkpoint's."""
        mu = self.mu if mu is None else mu
        sigma = self.sigma if sigma is None else sigma
        if not (math.isfinite(mu) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"invalid calibration mu={mu!r} sigma={sigma!r}")
        expected = (self.spec.channels, self.spec.image_size, self.spec.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            empty = np.zeros(0)
            return Scores(empty, empty.copy(), empty.copy())
        r, z, log_a = ops.pair_rscore(self.feature_map(x), mu, sigma)
        to_np = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
        return Scores(to_np(r), to_np(z), to_np(log_a))

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E(x)) for model inputs x [B, C, S, S] in [-1, 1], float32 on the CPU (for reports)."""
        x = x.to(self.device).contiguous(memory_format=self._memory_format)
        return self.model.generator(self.model.encoder(x)).float().cpu().contiguous()

    def score_images(self, images, mu: float | None = None, sigma: float | None = None) -> Scores:
        return self.score_tensor(self.prepare(images), mu, sigma)

    def r_scores(self, x: torch.Tensor | np.ndarray, batch_size: int = 256, desc: str | None = None) -> np.ndarray:
        """R-scores of many inputs in chunks: a model-input tensor, or uint8 [N, S, S, C] images already
        fitted to the model size (converted chunk by chunk, so a large set is never one float copy).
        `desc` shows progress under that name."""
        out = []
        with progress(total=len(x), desc=desc, unit="img") if desc else contextlib.nullcontext() as bar:
            for i in range(0, len(x), batch_size):
                chunk = x[i : i + batch_size]
                out.append(self.score_tensor(chunk if isinstance(chunk, torch.Tensor) else to_tensor(chunk)).r)
                if bar is not None:
                    bar.update(len(out[-1]))
        return np.concatenate(out) if out else np.zeros(0)


def score_frames(scorer: Scorer, frames: Iterable[tuple[np.ndarray, str | None]], fitter: CalibrationFitter,
                 batch_size: int = 256, limit: int | None = None) -> FitTally:
    """Scores (image, camera id) pairs in batches into `fitter`, at most `limit`, with progress.
    Returns the tally of frames that did not fit the model as they were (size, channels)."""
    tally = FitTally(scorer.spec)
    images: list[np.ndarray] = []
    cameras: list[str | None] = []

    def flush() -> None:
        if images:
            fitter.update(scorer.score_images(images).r, cameras)
            bar.update(len(images))
            images.clear()
            cameras.clear()

    with progress(total=limit, desc="calibrating", unit="frame") as bar:
        for count, (image, camera) in enumerate(frames, start=1):
            tally.add(native_shape(image))
            images.append(image)
            cameras.append(camera)
            if len(images) == batch_size:
                flush()
            if limit is not None and count >= limit:
                break
        flush()
    return tally
