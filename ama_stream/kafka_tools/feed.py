"""Feeding frames to a topic: what `produce`, the demo, the tests and the benchmark publish.

Frames carry the headers of the wire format (content-type, frame-id, camera-id, captured-at)
and are keyed by camera id. Anomalies from a second source can be mixed in at a fraction,
with the ground truth (frame-id -> label) kept for scoring the detector afterwards.
"""
from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from kafka import KafkaProducer

from ama_stream.fileio import atomic_write_bytes

from ama_stream.agent.frames import encode_frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedItem:
    frame_id: str
    image: np.ndarray  # uint8 HxW or HxWxC
    anomaly: bool
    item_id: str  # where the image came from (file, FILE#INDEX)


def mixed_items(
    normal: Iterator[tuple[str, np.ndarray, object]],
    anomalies: Iterator[tuple[str, np.ndarray, object]] | None,
    fraction: float,
    *,
    limit: int | None,
    seed: int,
    prefix: str,
) -> Iterator[FeedItem]:
    """Normal items with each position replaced by an anomaly with probability `fraction` (seeded).

    Stops after `limit` items or when the source to draw from runs out.
    """
    rng = np.random.default_rng(seed)
    for seq in itertools.count():
        if limit is not None and seq >= limit:
            return
        use_anomaly = anomalies is not None and rng.random() < fraction
        try:
            item_id, image, _label = next(anomalies if use_anomaly else normal)
        except StopIteration:
            log.info("%s source exhausted after %d frames", "anomaly" if use_anomaly else "normal", seq)
            return
        yield FeedItem(f"{prefix}-{seq:08d}", image, use_anomaly, item_id)


def frame_headers(frame_id: str, camera_id: str, content_type: str, captured_at_ms: int) -> list[tuple[str, bytes]]:
    return [
        ("content-type", content_type.encode()),
        ("frame-id", frame_id.encode()),
        ("camera-id", camera_id.encode()),
        ("captured-at", str(captured_at_ms).encode()),
    ]


class _Pacer:
    """Sleeps so that frame i goes out at start + i / rate (no drift from per-frame overheads)."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.start = time.monotonic()

    def wait(self, i: int) -> None:
        if self.rate:
            delay = self.start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def publish_items(
    producer: KafkaProducer,
    topic: str,
    items: Iterable[FeedItem],
    *,
    content_type: str,
    cameras: Sequence[str],
    rate: float | None = None,
    on_sent: Callable[[FeedItem], None] = lambda item: None,
) -> int:
    """Publishes every item (item i from cameras[i % len(cameras)]) and waits for all acknowledgements.

    Returns the count; raises RuntimeError when a send failed.
    """
    errors: list[BaseException] = []
    pacer = _Pacer(rate)
    keys = [camera.encode() for camera in cameras]
    n = 0
    for n, item in enumerate(items, start=1):
        pacer.wait(n - 1)
        camera = (n - 1) % len(cameras)
        value = encode_frame(item.image, content_type)
        headers = frame_headers(item.frame_id, cameras[camera], content_type, int(time.time() * 1000))
        producer.send(topic, key=keys[camera], value=value, headers=headers).add_errback(errors.append)
        on_sent(item)
        if errors:
            break
    producer.flush()
    if errors:
        raise RuntimeError(f"publishing to {topic} failed: {type(errors[0]).__name__}: {errors[0]}")
    return n


def truth_row(item: FeedItem) -> tuple[str, int, str]:
    return item.frame_id, int(item.anomaly), item.item_id


def write_truth(path: str | os.PathLike, rows: Iterable[tuple[str, int, str]]) -> None:
    """CSV `frame_id,anomaly,item_id` (anomaly 0/1), written atomically."""
    rows = [("frame_id", "anomaly", "item_id"), *rows]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    atomic_write_bytes(Path(path), out.getvalue().encode())
