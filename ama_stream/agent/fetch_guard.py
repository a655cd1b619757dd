"""Polls that survive records the Kafka client cannot read.

kafka-python raises out of `poll()` when it cannot parse what it fetched: a compressed batch in a
codec it lacks or cannot inflate, a batch failing its CRC, a header name that is not UTF-8
(librdkafka and Java producers can send one). After such an error its fetcher keeps the dead
record iterator of that partition, and every later poll spins on it for ever unless the
partition's position moves. So a raising poll is handled here, in one place:

- `FetchGuard.poll` finds the partition and offset the client is stuck at, seeks one past it and
  returns an `UnreadableRecord` in the record's place. The run loop dead-letters it like any frame
  it cannot use (reason `unsupported-codec`, `corrupt-record` or `fetch-error`) and commits past it,
  so the other partitions keep flowing, nothing is lost silently and a restart does not meet the
  record again. A batch kafka-python cannot open is skipped one offset at a time (each offset gets
  its dead letter); each run of skipped offsets is logged once, as a range.
- An error that names no partition (the broker refusing the fetch, say) is counted and retried
  after a pause; it is reported to the caller so readiness can fall while it lasts.

Every failure is counted by reason (`ama_fetch_errors_total{reason}` in the agent).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from kafka.errors import CorruptRecordError, UnsupportedCodecError
from kafka.structs import TopicPartition

from .inflation import InflatedTooLarge

log = logging.getLogger(__name__)

# the pause after an error that names no partition, so a persistent one cannot spin the loop
UNLOCATED_PAUSE_S = 0.5
_OFFSET_IN_MESSAGE = re.compile(r"partition=(\d+)\).*?offset (\d+)")
_TOPIC_IN_MESSAGE = re.compile(r"topic='([^']*)'")


@dataclass(frozen=True)
class UnreadableRecord:
    """Stands in for a record the client could not read; shaped like a ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    reason: str  # unsupported-codec, corrupt-record, too-large (inflated past the batch limit), fetch-error
    error: str  # "reason: what the client said", for the dead letter's `error` header
    timestamp: int = -1
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple = field(default_factory=tuple)


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, InflatedTooLarge):
        return "too-large"
    if isinstance(exc, UnsupportedCodecError):
        return "unsupported-codec"
    if isinstance(exc, CorruptRecordError):
        return "corrupt-record"
    return "fetch-error"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]  # the client may quote the whole record


def stuck_position(consumer, exc: BaseException) -> tuple[TopicPartition, int] | None:
    """(partition, offset) the consumer cannot read past after `exc`, or None when the error names none.

    kafka-python keeps the failed partition's records object as the fetcher's next in line; its
    next offset, never behind the consumer's position, is the record that failed. Without it the
    error's message may name the place (CRC failures do)."""
    part = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    tp = getattr(part, "topic_partition", None)
    if tp is not None:
        offset = int(part.next_fetch_offset)
        try:
            offset = max(offset, int(consumer.position(tp, timeout_ms=1000)))
        except Exception:  # noqa: BLE001 - the records object's offset is still the best known
            pass
        return tp, offset
    text = str(exc)
    found, topic = _OFFSET_IN_MESSAGE.search(text), _TOPIC_IN_MESSAGE.search(text)
    if found and topic:
        tp = TopicPartition(topic.group(1), int(found.group(1)))
        if tp in consumer.assignment():
            return tp, int(found.group(2))
    return None


@dataclass
class _Run:
    """Consecutive unreadable offsets of one partition, logged once as a range."""

    first: int
    last: int
    reason: str


class FetchGuard:
    """`poll()` with the consumer's signature, which never raises for what was fetched."""

    def __init__(self, consumer, what: str, on_error: Callable[[str, bool], None] = lambda reason, located: None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        """`what`: the consumer's name in log lines; `on_error(reason, located)`: called for every
        failure (the agent counts it and, for one that names no partition, lets readiness fall)."""
        self.consumer = consumer
        self.what = what
        self.on_error = on_error
        self.clock = clock
        self.sleep = sleep
        self.skipped = 0  # offsets skipped so far
        self._runs: dict[TopicPartition, _Run] = {}
        self._unlocated_streak = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        """{tp: [records]}: the consumer's own, or one UnreadableRecord for the offset it skipped."""
        try:
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, the caller keeps running
            return self._failed(exc, timeout_ms)
        if self._unlocated_streak:
            log.info("%s: fetching works again after %d failed polls", self.what, self._unlocated_streak)
            self._unlocated_streak = 0
        for tp in [tp for tp in self._runs if polled.get(tp)]:
            self._close_run(tp)
        return polled

    def _failed(self, exc: Exception, timeout_ms: int) -> dict:
        reason = failure_reason(exc)
        where = stuck_position(self.consumer, exc)
        self.on_error(reason, where is not None)
        if where is None:
            if not self._unlocated_streak:
                log.warning("%s: fetching failed (%s: %s); retrying, not ready meanwhile", self.what,
                            type(exc).__name__, _describe(exc))
            self._unlocated_streak += 1
            self.sleep(min(UNLOCATED_PAUSE_S, max(timeout_ms, 50) / 1000))
            return {}
        tp, offset = where
        self.consumer.seek(tp, offset + 1)  # a new position also makes the client drop the dead iterator
        self.skipped += 1
        self._note(tp, offset, reason, exc)
        record = UnreadableRecord(tp.topic, tp.partition, offset, reason, f"{reason}: {_describe(exc)}")
        return {tp: [record]}

    def _note(self, tp: TopicPartition, offset: int, reason: str, exc: Exception) -> None:
        run = self._runs.get(tp)
        if run is not None and run.last + 1 == offset and run.reason == reason:
            run.last = offset
            return
        if run is not None:
            self._close_run(tp)
        log.warning("%s: cannot read %s[%d] at offset %d (%s: %s); skipping it with a dead letter", self.what,
                    tp.topic, tp.partition, offset, type(exc).__name__, _describe(exc))
        self._runs[tp] = _Run(offset, offset, reason)

    def _close_run(self, tp: TopicPartition) -> None:
        run = self._runs.pop(tp)
        if run.last > run.first:
            log.warning("%s: skipped %s[%d] offsets %d-%d (%d records, %s), each dead-lettered", self.what,
                        tp.topic, tp.partition, run.first, run.last, run.last - run.first + 1, run.reason)


__all__ = ["FetchGuard", "UnreadableRecord", "failure_reason", "stuck_position"]
