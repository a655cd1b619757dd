"""The agent's work units: a polled batch of frames -> decoded model input -> scored results.

`FrameDecoder` runs on a worker thread (decoding overlaps scoring); `score_batch` runs on the
run loop's thread and reads the calibration it is given once per batch, so a calibration
swapped in between batches applies to whole batches only.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from kafka.structs import TopicPartition

from ama_stream.calibration import Calibration
from ama_stream.preprocess import FitTally, fit_image, native_shape, to_tensor
from ama_stream.scoring import Scorer

from .frames import FrameError, FrameLimits, decode_frame
from .records import FrameMeta

log = logging.getLogger(__name__)


@dataclass
class Rejected:
    """A frame for the dead-letter topic, with its original value."""

    meta: FrameMeta
    value: bytes | None
    reason: str  # short code, the label of the dead-letter metric
    error: str  # the `error` header: "reason: explanation"


@dataclass
class PolledBatch:
    records: list  # kafka-python ConsumerRecords, in poll order
    epoch: int  # OffsetBook revocation epoch before the first of them was polled


@dataclass
class DecodedBatch:
    frames: list[FrameMeta]
    values: list[bytes]  # the original values of `frames`, for dead letters if scoring fails
    inputs: torch.Tensor | None  # [B, C, S, S] model input for `frames`, pinned when scoring on CUDA
    rejected: list[Rejected]
    positions: dict[TopicPartition, int]  # per partition: the offset after the last frame of the batch
    epoch: int
    size: int  # frames in the batch, decodable or not
    decode_s: float
    misfit: FitTally | None = None  # frames that did not fit the model as they were (size, channels)


@dataclass
class ScoredFrame:
    meta: FrameMeta
    r: float
    z: float
    log_a: float
    p_value: float
    anomaly: bool
    threshold: float


@dataclass
class ScoredBatch:
    scored: list[ScoredFrame] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    score_s: float = 0.0


def _positions(records) -> dict[TopicPartition, int]:
    out: dict[TopicPartition, int] = {}
    for rec in records:
        tp = TopicPartition(rec.topic, rec.partition)
        out[tp] = max(out.get(tp, -1), rec.offset + 1)
    return out


class FrameDecoder:
    """Raw records -> DecodedBatch. Thread-safe: holds no state besides its configuration."""

    def __init__(self, scorer: Scorer, limits: FrameLimits):
        self.scorer = scorer
        self.limits = limits
        self.pin = scorer.device.type == "cuda"  # page-locked input makes the host-to-device copy asynchronous

    def __call__(self, batch: PolledBatch) -> DecodedBatch:
        """Each frame is decoded and at once fitted to the model size, so its native pixels are freed
        before the next frame is decoded: a batch of 64 frames of 4096x4096 RGBA holds one such
        frame at a time (64 MiB), not 4 GiB. The batch's pixel budget (limits.max_batch_pixels)
        bounds its decoding work: a frame past it is dead-lettered, value kept, for `replay`."""
        t0 = time.perf_counter()
        frames: list[FrameMeta] = []
        values: list[bytes] = []
        fitted: list[np.ndarray] = []
        rejected: list[Rejected] = []
        misfit = FitTally(self.scorer.spec)
        pixels_left = self.limits.max_batch_pixels
        for rec in batch.records:
            meta = FrameMeta.from_record(rec)
            if meta.envelope_error is not None:  # never decoded: its envelope cannot be published whole
                rejected.append(Rejected(meta, rec.value, "header-too-large", meta.envelope_error))
                continue
            try:
                native = decode_frame(rec.value, meta.content_type, self.limits, pixels_left)
            except FrameError as exc:
                rejected.append(Rejected(meta, rec.value, exc.reason, str(exc)))
                continue
            try:
                fitted.append(fit_image(native, self.scorer.spec))
            except ValueError as exc:  # decode_frame admits only what fit_image accepts; a guard all the same
                rejected.append(Rejected(meta, rec.value, "preprocess-failed", f"preprocess-failed: {exc}"))
                continue
            misfit.add(native_shape(native))
            pixels_left -= native.shape[0] * native.shape[1]
            del native
            frames.append(meta)
            values.append(rec.value)
        inputs = None
        if fitted:
            inputs = to_tensor(np.stack(fitted))
            inputs = inputs.pin_memory() if self.pin else inputs
        return DecodedBatch(
            frames=frames,
            values=values,
            inputs=inputs,
            rejected=rejected,
            positions=_positions(batch.records),
            epoch=batch.epoch,
            size=len(batch.records),
            decode_s=time.perf_counter() - t0,
            misfit=misfit,
        )


def _reject(batch: DecodedBatch, i: int, error: str) -> Rejected:
    return Rejected(batch.frames[i], batch.values[i], "score-failed", f"score-failed: {error}")


def score_batch(scorer: Scorer, calibration: Calibration, batch: DecodedBatch) -> ScoredBatch:
    """Scores the decoded frames; a frame that cannot be scored becomes a Rejected (with its value)."""
    out = ScoredBatch(rejected=list(batch.rejected))
    if batch.inputs is None:
        return out
    t0 = time.perf_counter()
    n = len(batch.frames)
    try:
        r = scorer.score_tensor(batch.inputs).r
        errors: dict[int, str] = {}
    except Exception as exc:  # noqa: BLE001 - isolate the frame(s) that make scoring fail
        log.warning("scoring a batch of %d failed (%s); scoring its frames one by one", n, exc)
        r, errors = np.full(n, np.nan), {}
        for i in range(n):
            try:
                r[i] = scorer.score_tensor(batch.inputs[i : i + 1]).r[0]
            except Exception as one_exc:  # noqa: BLE001
                errors[i] = f"{type(one_exc).__name__}: {one_exc}"
    ok = []
    for i in range(n):
        if i in errors or not math.isfinite(r[i]):
            out.rejected.append(_reject(batch, i, errors.get(i, f"non-finite R-score {r[i]}")))
        else:
            ok.append(i)
    if ok:
        metas = [batch.frames[i] for i in ok]
        d = calibration.decide(r[ok], [m.camera_id for m in metas])
        for j, meta in enumerate(metas):
            out.scored.append(ScoredFrame(
                meta=meta, r=float(r[ok[j]]), z=float(d.z[j]), log_a=float(d.log_a[j]), p_value=float(d.p_value[j]),
                anomaly=bool(d.anomaly[j]), threshold=float(d.threshold[j]),
            ))
    out.score_s = time.perf_counter() - t0
    return out
