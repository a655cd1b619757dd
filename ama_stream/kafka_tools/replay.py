"""Reading known-normal frames back from a topic for `ama-stream calibrate`, outside any consumer group.

The reader assigns the topic's partitions itself (no group id), so it neither joins the agent's
group nor commits offsets: the agent's position is untouched. It starts at the beginning of
what the topic retains, or with the frames of the last `window_s` seconds (by record timestamp:
the broker's offset-for-time lookup positions it, and older records are skipped as well, since
not every Kafka-protocol broker answers that lookup exactly), and reads up to the end offsets
seen at start; with a `limit` it keeps reading live frames until it has that many or none
arrived for `idle_timeout_s`.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from ama_stream.agent.fetch_guard import FetchGuard, UnreadableRecord
from ama_stream.agent.frames import FrameError, FrameLimits, decode_frame
from ama_stream.agent.kafka_io import build_client, describe
from ama_stream.agent.envelope import FrameMeta
from ama_stream.agent.settings import KafkaSection

log = logging.getLogger(__name__)

POLL_MS = 200


@dataclass
class ReplayStats:
    read: int = 0
    undecodable: Counter = field(default_factory=Counter)  # reason -> frames skipped


def topic_frames(
    kafka: KafkaSection,
    topic: str,
    *,
    limit: int | None = None,
    window_s: float | None = None,
    idle_timeout_s: float = 10.0,
    limits: FrameLimits = FrameLimits(),
    stats: ReplayStats | None = None,
    connect_timeout_s: float = 10.0,
) -> Iterator[tuple[np.ndarray, str | None]]:
    """(decoded image, camera id) of the topic's frames; undecodable frames are counted in `stats` and skipped.

    A broker that cannot be reached, or fails while reading, ends the iteration with a one-line RuntimeError.
    """
    stats = stats if stats is not None else ReplayStats()
    try:
        yield from _read(kafka, topic, limit, window_s, idle_timeout_s, limits, stats, connect_timeout_s)
    except KafkaError as exc:
        raise RuntimeError(f"reading topic {topic!r} from {kafka.bootstrap_servers} failed: {describe(exc)}") from None


def _read(kafka: KafkaSection, topic: str, limit: int | None, window_s: float | None, idle_timeout_s: float,
          limits: FrameLimits, stats: ReplayStats, connect_timeout_s: float) -> Iterator[tuple[np.ndarray, str | None]]:
    consumer = build_client(KafkaConsumer, **kafka.client_config(), group_id=None, enable_auto_commit=False,
                            bootstrap_timeout_ms=int(connect_timeout_s * 1000))
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(f"topic {topic!r} does not exist on {kafka.bootstrap_servers}")
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        since_ms = None if window_s is None else int((time.time() - window_s) * 1000)
        _seek_start(consumer, parts, ends, since_ms)
        last_frame = time.monotonic()
        fetched = FetchGuard(consumer, f"reading {topic}")  # records the client cannot read are skipped
        while limit is None or stats.read < limit:
            caught_up = all(consumer.position(tp) >= ends[tp] for tp in parts)
            if caught_up and limit is None:
                break
            if caught_up and time.monotonic() - last_frame > idle_timeout_s:
                log.warning("%s: no new frame for %.0f s; stopping at %d frames", topic, idle_timeout_s, stats.read)
                break
            budget = None if limit is None else limit - stats.read
            batches = fetched.poll(timeout_ms=POLL_MS, max_records=budget)
            for record in (r for records in batches.values() for r in records):
                last_frame = time.monotonic()
                if isinstance(record, UnreadableRecord):
                    stats.undecodable[record.reason] += 1
                    continue
                if since_ms is not None and record.timestamp < since_ms:
                    continue  # before the window (the seek is only a hint: some brokers ignore timestamps)
                meta = FrameMeta.from_record(record)
                try:
                    image = decode_frame(record.value, meta.content_type, limits)
                except FrameError as exc:
                    stats.undecodable[exc.reason] += 1
                    log.debug("skipping frame %s: %s", meta.frame_id, exc)
                    continue
                stats.read += 1
                yield image, meta.camera_id
                if limit is not None and stats.read >= limit:
                    break
    finally:
        consumer.close(autocommit=False)


def _seek_start(consumer: KafkaConsumer, parts: list[TopicPartition], ends: dict, since_ms: int | None) -> None:
    if since_ms is None:
        consumer.seek_to_beginning(*parts)
        return
    found = consumer.offsets_for_times({tp: since_ms for tp in parts})
    for tp in parts:
        at = found.get(tp)
        consumer.seek(tp, at.offset if at is not None else ends[tp])  # nothing that recent: start at the end
