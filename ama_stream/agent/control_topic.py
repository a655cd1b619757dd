"""The control topic (`topics.calibration`): calibration documents and model messages published
while the agent runs, read outside any consumer group. A message whose key names another model id is
skipped; model messages may only name files inside the allowed folders; with a control key, only
signed messages are taken."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from ama_stream.calibration import CalibrationError, parse_calibration

from .fetch_guard import FetchGuard, UnreadableRecord
from .kafka_io import build_client, describe
from .model_state import ModelRequest, Update
from .settings import AgentSettings
from .signing import signed_by

log = logging.getLogger(__name__)

MODEL_FORMAT = "ama-stream/model"
MODEL_MESSAGE_VERSION = 1
MAX_MODEL_MESSAGE_BYTES = 64 * 1024  # a model message names two paths; larger values are calibrations
_MODEL_KEYS = {"format", "version", "checkpoint", "calibration"}


def model_message(value: bytes, origin: str, allowed_dirs: list[Path] | None = None) -> ModelRequest | None:
    """The ModelRequest of a model message, one refused with the reason if the message is malformed
    or names a file outside `allowed_dirs` (None: any), or None when `value` is not a model message
    (then it is a calibration document). The refusal does not say whether such a file exists."""
    if len(value) > MAX_MODEL_MESSAGE_BYTES:
        return None
    try:
        payload = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        return None

    def refused(why: str) -> ModelRequest:
        return ModelRequest("topic", origin, None, None, error=f"{origin}: model message {why}")

    version = payload.get("version")
    if type(version) is not int or version != MODEL_MESSAGE_VERSION:  # not True or 1.0, which equal 1
        return refused(f"version {version!r} is not supported (expected {MODEL_MESSAGE_VERSION})")
    unknown = payload.keys() - _MODEL_KEYS
    if unknown:
        return refused(f"has unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    paths: dict[str, Path | None] = {}
    for key in ("checkpoint", "calibration"):
        value_ = payload.get(key)
        if value_ is None and key == "calibration":
            paths[key] = None
            continue
        if not isinstance(value_, str) or not value_ or "\0" in value_ or not os.path.isabs(value_):
            return refused(f"needs `{key}` as an absolute path on the agent's host, got {value_!r}")
        if allowed_dirs is not None and not _inside(value_, allowed_dirs):
            return refused(f"names `{key}` {value_!r} outside the folders model messages may use "
                           f"({', '.join(map(str, allowed_dirs)) or 'none'}; setting model_dirs)")
        paths[key] = Path(value_)
    return ModelRequest("topic", origin, paths["checkpoint"], paths["calibration"])


def _inside(path: str, folders: list[Path]) -> bool:
    """The path, every symbolic link resolved (a link cannot lead out), lies inside one of `folders`."""
    resolved = Path(os.path.realpath(path))
    return any(resolved.is_relative_to(folder) for folder in folders)


class ControlTopic:
    """Calibration documents and model messages from a Kafka topic, read with manual assignment
    (no group, no commits)."""

    def __init__(self, settings: AgentSettings, on_fetch_error: Callable[[str, bool], None] = lambda reason, located: None):
        """`on_fetch_error(reason, located)`: a poll failed on what it fetched (fetch_guard.FetchGuard)."""
        self.topic = settings.topics.calibration
        self.check_every_s = settings.calibration_check_s
        self.allowed_dirs = settings.allowed_model_dirs()
        self.key = settings.control_key.get_secret_value().encode() if settings.control_key else None
        config = {**settings.consumer, **settings.kafka.client_config()}
        for group_only in ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms", "auto_offset_reset"):
            config.pop(group_only, None)
        config.setdefault("bootstrap_timeout_ms", int(settings.retry.connect_timeout_s * 1000))
        self.consumer = build_client(KafkaConsumer, **config, group_id=None, enable_auto_commit=False)
        self.messages = FetchGuard(self.consumer, f"calibration topic {self.topic}", on_fetch_error)
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

    def check(self, now: float, model_id: str) -> list[Update | ModelRequest]:
        """New messages for an agent of model `model_id`, in the order they were published."""
        if now < self._next_check:
            return []
        self._next_check = now + self.check_every_s
        try:
            if not self._assigned:
                self._assign(at_start=False)
                if not self._assigned:
                    return []
            polled = self.messages.poll(timeout_ms=0)  # never raises for what it fetched: unreadable ones are skipped
        except KafkaError as exc:
            log.warning("reading the calibration topic %s failed (%s); retrying", self.topic, describe(exc))
            return []
        updates: list[Update | ModelRequest] = []
        for record in sorted((r for records in polled.values() for r in records), key=lambda r: r.timestamp):
            if isinstance(record, UnreadableRecord):
                continue  # logged and counted by the guard; there is nothing to apply
            origin = f"{record.topic}[{record.partition}]@{record.offset}"
            if self.key is not None and not signed_by(self.key, record.value, record.headers):
                updates.append(Update("topic", origin, None, f"{origin}: not signed with the control key "
                                                             "(AMA_CONTROL_KEY; a `signature` header)"))
                continue
            key = record.key.decode("utf-8", "replace") if record.key else None
            if key is not None and key != model_id:
                log.debug("skipping control message %s: keyed for model %s", origin, key)
                continue
            value = record.value or b""
            request = model_message(value, origin, self.allowed_dirs)
            if request is not None:
                updates.append(request)
                continue
            try:
                updates.append(Update("topic", origin, parse_calibration(value, model_id, origin)))
            except CalibrationError as exc:
                updates.append(Update("topic", origin, None, str(exc)))
        return updates

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log.warning("closing the calibration topic consumer failed: %s", exc)
