"""What a running agent swaps: the model in force (Scorer + Calibration + its FrameDecoder), and the
requests that may replace it (a new calibration, a new model) with what the loader made of one."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ama_stream.calibration import Calibration

from .decode import DecodedBatch, FrameDecoder, PolledBatch


@dataclass(frozen=True)
class Model:
    """The model in force: the Scorer, the Calibration that decides its R-scores, and the
    FrameDecoder that fits frames to its input (size, channels). Immutable: a swap replaces it."""

    scorer: Any  # Scorer, or anything with spec, device, model_id and r_scores (tests)
    calibration: Calibration
    decoder: FrameDecoder
    origin: str = ""  # where it was loaded from, for logs

    @property
    def model_id(self) -> str:
        return self.scorer.model_id

    def with_calibration(self, calibration: Calibration) -> "Model":
        return replace(self, calibration=calibration)

    def decode(self, batch: PolledBatch) -> DecodedBatch:
        """Decodes a batch for this model (on the decode thread); the batch keeps the model, which
        scores and decides it even if another one is swapped in meanwhile."""
        decoded = self.decoder(batch)
        decoded.model = self
        return decoded

    def describe(self) -> str:
        spec = self.scorer.spec
        return f"input {spec.image_size}x{spec.image_size}x{spec.channels} on {self.scorer.device}"


@dataclass(frozen=True)
class Update:
    """A new calibration for the model in force."""

    source: str  # "file" or "topic" (the metric label)
    origin: str  # the file, or TOPIC[PARTITION]@OFFSET
    calibration: Calibration | None  # None: refused
    error: str = ""


@dataclass(frozen=True)
class ModelRequest:
    """A new model to load: a checkpoint and the calibration that goes with it."""

    source: str  # "file" or "topic" (the metric label)
    origin: str  # the checkpoint file, or TOPIC[PARTITION]@OFFSET
    checkpoint: Path | None
    calibration: Path | None  # None: the checkpoint's own statistics (|z| > 3)
    signature: tuple | None = None  # file requests: ModelFiles.signatures() when the change was seen
    error: str = ""  # refused before loading (a malformed message)


@dataclass(frozen=True)
class Loaded:
    """What the loader made of a ModelRequest."""

    model: Model | None = None  # a new model, ready (warmed up)
    calibration: Calibration | None = None  # the checkpoint is the model in force: only this may be new
    error: str = ""  # refused
