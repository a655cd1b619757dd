"""New calibrations for a running agent: a changed calibration file, or a document on a control topic.

The run loop asks for updates between batches (every `calibration_check_s`) and swaps the one
calibration object that scores all batches, so a batch is decided by one calibration only and no
frame is skipped or scored twice. Anything that fails validation comes back as a refused Update:
the agent logs it, counts it, and keeps the calibration in force.

- File: a new version is noticed by its (device, inode, size, mtime) changing; `ama-stream
  calibrate` replaces the file atomically (new inode). A writer that rewrites it in place may be
  caught half-way: that read is refused, and the finished file (new size/mtime) is read next time.
- Control topic (`topics.calibration`): each message value is a calibration JSON document, as
  written by `ama-stream calibrate`. Read outside any consumer group, from the end of the topic
  at start-up (only calibrations published while the agent runs), or from its beginning when the
  topic appears later. A message whose key names another model id is skipped (one topic can serve
  agents of several models); any other message is validated against this agent's model.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from ama_stream.calibration import Calibration, CalibrationError, load_calibration, parse_calibration

from .kafka_io import build_client, describe
from .settings import AgentSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    source: str  # "file" or "topic" (the metric label)
    origin: str  # the file, or TOPIC[PARTITION]@OFFSET
    calibration: Calibration | None  # None: refused
    error: str = ""


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class CalibrationFile:
    """The agent's calibration file: loaded at start-up (errors are fatal then), watched afterwards."""

    def __init__(self, path: str | os.PathLike, model_id: str, check_every_s: float):
        self.path = Path(path)
        self.model_id = model_id
        self.check_every_s = check_every_s
        self._signature = _signature(self.path)  # before reading: a change after it is seen by the next check
        self.initial = load_calibration(self.path, model_id)
        self._next_check = time.monotonic() + check_every_s

    def check(self, now: float) -> Update | None:
        if now < self._next_check:
            return None
        self._next_check = now + self.check_every_s
        signature = _signature(self.path)
        if signature == self._signature:
            return None
        self._signature = signature
        if signature is None:
            return Update("file", str(self.path), None, f"{self.path}: the calibration file is gone or unreadable")
        try:
            return Update("file", str(self.path), load_calibration(self.path, self.model_id))
        except CalibrationError as exc:
            return Update("file", str(self.path), None, str(exc))


class ControlTopic:
    """Calibration documents from a Kafka topic, read with manual assignment (no group, no commits)."""

    def __init__(self, settings: AgentSettings, model_id: str):
        self.topic = settings.topics.calibration
        self.model_id = model_id
        self.check_every_s = settings.calibration_check_s
        config = {**settings.consumer, **settings.kafka.client_config()}
        for group_only in ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms", "auto_offset_reset"):
            config.pop(group_only, None)
        config.setdefault("bootstrap_timeout_ms", int(settings.retry.connect_timeout_s * 1000))
        self.consumer = build_client(KafkaConsumer, **config, group_id=None, enable_auto_commit=False)
        self._assigned = False
        self._next_check = 0.0
        self._assign(at_start=True)

    def _assign(self, at_start: bool) -> None:
        partitions = self.consumer.partitions_for_topic(self.topic)
        if not partitions:
            if at_start:
                log.warning("calibration topic %s does not exist (yet); it is read from its beginning once it does",
                            self.topic)
            return
        parts = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(parts)
        if at_start:
            self.consumer.seek_to_end(*parts)
            for tp in parts:  # resolve "the end" now, not at the first poll: later messages must not be skipped
                self.consumer.position(tp)
        else:
            self.consumer.seek_to_beginning(*parts)
        self._assigned = True
        log.info("reading calibrations from topic %s (%d partitions)", self.topic, len(parts))

    def check(self, now: float) -> list[Update]:
        if now < self._next_check:
            return []
        self._next_check = now + self.check_every_s
        try:
            if not self._assigned:
                self._assign(at_start=False)
                if not self._assigned:
                    return []
            polled = self.consumer.poll(timeout_ms=0)
        except KafkaError as exc:
            log.warning("reading the calibration topic %s failed (%s); retrying", self.topic, describe(exc))
            return []
        updates = []
        for record in sorted((r for records in polled.values() for r in records), key=lambda r: r.timestamp):
            origin = f"{record.topic}[{record.partition}]@{record.offset}"
            key = record.key.decode("utf-8", "replace") if record.key else None
            if key is not None and key != self.model_id:
                log.debug("skipping calibration %s: keyed for model %s", origin, key)
                continue
            try:
                updates.append(Update("topic", origin, parse_calibration(record.value or b"", self.model_id, origin)))
            except CalibrationError as exc:
                updates.append(Update("topic", origin, None, str(exc)))
        return updates

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log.warning("closing the calibration topic consumer failed: %s", exc)


class CalibrationSwitch:
    """The calibration in force, and the one place that swaps it.

    The run loop calls `check(now)` between batches; it reads the file and the control topic (set
    later, once the broker is reachable) and swaps in each valid new calibration. `current` is read
    once per batch, so a batch is decided by one calibration only."""

    def __init__(self, calibration: Calibration, model_id: str, metrics, file: CalibrationFile | None = None):
        self.current = calibration
        self.model_id = model_id
        self.metrics = metrics
        self.file = file
        self.control_topic: ControlTopic | None = None
        self._show()

    def use(self, calibration: Calibration) -> None:
        """Swap the decision rule; takes effect from the next batch (any thread may call this)."""
        if calibration.model_id and calibration.model_id != self.model_id:
            raise ValueError(f"calibration is for model {calibration.model_id}, the agent scores with {self.model_id}")
        self.current = calibration

    def check(self, now: float) -> None:
        updates: list[Update] = []
        if self.file is not None:
            update = self.file.check(now)
            if update is not None:
                updates.append(update)
        if self.control_topic is not None:
            updates.extend(self.control_topic.check(now))
        for update in updates:
            self.apply(update)

    def apply(self, update: Update) -> None:
        """Swaps in a valid new calibration; a refused one is logged and counted, the old one stays."""
        counter = self.metrics.calibration_reloads
        old = self.current
        if update.calibration is None:
            counter.labels(source=update.source, result="refused").inc()
            log.error("new calibration from %s refused, keeping %s: %s", update.origin, old.calibration_id, update.error)
            return
        new = update.calibration
        if new.calibration_id == old.calibration_id:
            counter.labels(source=update.source, result="unchanged").inc()
            log.info("calibration from %s is the one in force (%s)", update.origin, new.calibration_id)
            return
        try:
            self.use(new)
        except ValueError as exc:
            counter.labels(source=update.source, result="refused").inc()
            log.error("new calibration from %s refused, keeping %s: %s", update.origin, old.calibration_id, exc)
            return
        counter.labels(source=update.source, result="ok").inc()
        self._show()
        rule = new.rule()
        log.info("calibration %s -> %s from %s: %s; global threshold %.4f (expected false-alarm rate %.3g), "
                 "%d camera entries", old.calibration_id, new.calibration_id, update.origin, new.policy.describe(),
                 rule.threshold, rule.expected_fpr, len(new.cameras))

    def _show(self) -> None:
        self.metrics.calibration.clear()
        self.metrics.calibration.labels(calibration_id=self.current.calibration_id,
                                        policy=self.current.policy.name).set(1)
