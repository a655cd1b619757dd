"""The decode stage: a polled batch of Kafka records -> model input tensor + frames to dead-letter.

`FrameDecoder` is a pure function of a batch (no state besides its configuration); `DecodeStage`
runs it on a worker thread so the next batches decode while the run loop scores this one, and
hands the decoded batches back in poll order. Each batch is decoded by the decoder it was
submitted with: the one of the model in force at that moment (model_state.Model), which the batch keeps.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
from kafka.structs import TopicPartition

from ama_stream.calibration import Calibration
from ama_stream.preprocess import FitTally, PreprocessSpec, fit_image, native_shape
from ama_stream.tiling import TileBatch, tile_fitted

from .fetch_guard import UnreadableRecord
from .frames import FrameError, FrameLimits, decode_frame
from .envelope import FrameMeta


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
    epoch: int  # the committer's revocation epoch before the first of them was polled


class BatchModel(Protocol):
    """What a batch keeps of the model it was decoded for (model_state.Model, which also holds the
    decoder, so it is described here rather than imported): it scores and decides the batch."""

    scorer: Any  # Scorer, or anything with spec, device, model_id and r_scores (tests)
    calibration: Calibration

    @property
    def model_id(self) -> str: ...


@dataclass
class DecodedBatch:
    frames: list[FrameMeta]
    values: list[bytes]  # the original values of `frames`, for dead letters if scoring fails
    inputs: TileBatch | None  # the model inputs of `frames`: one per frame, or each frame's patches
    rejected: list[Rejected]
    positions: dict[TopicPartition, int]  # per partition: the offset after the last frame of the batch
    epoch: int
    size: int  # frames in the batch, decodable or not
    decode_s: float
    misfit: FitTally | None = None  # frames that did not fit the model as they were (size, channels)
    model: BatchModel | None = None  # the model in force when the batch went to the decoder; it scores and decides it


def positions(records) -> dict[TopicPartition, int]:
    """Per partition, the offset after the last of `records` (what a commit of them says)."""
    out: dict[TopicPartition, int] = {}
    for rec in records:
        tp = TopicPartition(rec.topic, rec.partition)
        out[tp] = max(out.get(tp, -1), rec.offset + 1)
    return out


class FrameDecoder:
    """Raw records -> DecodedBatch. Thread-safe: holds no state besides its configuration.

    Takes the Scorer (or anything with `.spec: PreprocessSpec`), never calls it."""

    def __init__(self, scorer, limits: FrameLimits):
        self.spec: PreprocessSpec = scorer.spec
        self.limits = limits

    def __call__(self, batch: PolledBatch) -> DecodedBatch:
        """Each frame is decoded and at once fitted to the model (its size, or a patch model's scale), so its native pixels are freed
        before the next frame is decoded: a batch of 64 frames of 4096x4096 RGBA holds one such
        frame at a time (64 MiB), not 4 GiB. The batch's pixel budget (limits.max_batch_pixels)
        bounds its decoding work: a frame past it is dead-lettered, value kept, for `replay`."""
        t0 = time.perf_counter()
        frames: list[FrameMeta] = []
        values: list[bytes] = []
        fitted: list[np.ndarray] = []
        natives: list[tuple[int, int]] = []
        rejected: list[Rejected] = []
        misfit = FitTally(self.spec)
        pixels_left = self.limits.max_batch_pixels
        for rec in batch.records:
            meta = FrameMeta.from_record(rec)
            if isinstance(rec, UnreadableRecord):  # the client could not read it (fetch_guard.py)
                rejected.append(Rejected(meta, None, rec.reason, rec.error))
                continue
            if meta.envelope_error is not None:  # never decoded: its envelope cannot be published whole
                rejected.append(Rejected(meta, rec.value, "header-too-large", meta.envelope_error))
                continue
            try:
                native = decode_frame(rec.value, meta.content_type, self.limits, pixels_left)
            except FrameError as exc:
                rejected.append(Rejected(meta, rec.value, exc.reason, str(exc)))
                continue
            try:
                fitted.append(fit_image(native, self.spec))
            except ValueError as exc:  # decode_frame admits only what fit_image accepts; a guard all the same
                rejected.append(Rejected(meta, rec.value, "preprocess-failed", f"preprocess-failed: {exc}"))
                continue
            misfit.add(native_shape(native))
            natives.append(native.shape[:2])
            pixels_left -= native.shape[0] * native.shape[1]
            del native
            frames.append(meta)
            values.append(rec.value)
        return DecodedBatch(
            frames=frames,
            values=values,
            inputs=tile_fitted(fitted, natives, self.spec) if fitted else None,  # cut into patches here, off the loop
            rejected=rejected,
            positions=positions(batch.records),
            epoch=batch.epoch,
            size=len(batch.records),
            decode_s=time.perf_counter() - t0,
            misfit=misfit,
        )


class DecodeStage:
    """Decodes polled batches on one worker thread, `ahead` at most waiting, returned in poll order."""

    def __init__(self, ahead: int):
        self.ahead = ahead
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ama-decode")
        self._pending: deque[Future[DecodedBatch]] = deque()

    def __len__(self) -> int:
        """Batches submitted and not yet taken back."""
        return len(self._pending)

    def submit(self, batch: PolledBatch, decode: Callable[[PolledBatch], DecodedBatch]) -> None:
        """`decode`: what decodes this batch on the worker thread. The agent passes the model in
        force's `Model.decode` (model_state.py), which also records that model in the DecodedBatch, to
        score and decide it; a bare FrameDecoder leaves `DecodedBatch.model` None (stage tests)."""
        self._pending.append(self._pool.submit(decode, batch))

    def decoded(self, wait: bool) -> Iterator[DecodedBatch]:
        """The decoded batches in poll order: those finished, and more while `ahead` are waiting;
        with `wait`, all of them (blocking until each is decoded)."""
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.ahead or wait):
            yield self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
