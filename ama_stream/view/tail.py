"""The alert page's readers: the alerts (and maps) topics tailed into the Board on a thread that
reconnects when the broker goes away, frames fetched from the frames topic at an alert's offset,
and the agent's health and drift read from its /readyz and /metrics."""
from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import urllib.request
from collections import OrderedDict

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition
from PIL import Image

from ama_stream.agent.fetch_guard import FetchGuard, UnreadableRecord
from ama_stream.agent.frames import FrameError, FrameLimits, decode_frame
from ama_stream.agent.kafka_io import build_client, describe
from ama_stream.agent.envelope import FrameMeta
from ama_stream.agent.settings import KafkaSection

from .board import Board

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 64 * 1024  # an alert record is a few hundred bytes
PROBE_EVERY_S = 2.0  # how often the tail checks that the broker still answers


def _consumer(kafka: KafkaSection, read_committed: bool, timeout_s: float) -> KafkaConsumer:
    return build_client(KafkaConsumer, **kafka.client_config(), group_id=None, enable_auto_commit=False,
                        auto_offset_reset="earliest", fetch_max_wait_ms=100, bootstrap_timeout_ms=int(timeout_s * 1000),
                        request_timeout_ms=max(int(timeout_s * 1000), 5000),
                        isolation_level="read_committed" if read_committed else "read_uncommitted")


class AlertTail:
    """Keeps the Board filled from the alerts topic (newest `backlog` alerts per partition at start, then
    live) and the maps topic; a broker that stops answering turns the board to "reconnecting" until a
    fresh consumer gets through."""

    def __init__(self, kafka: KafkaSection, alerts_topic: str, maps_topic: str | None, board: Board,
                 read_committed: bool = False, backlog: int = 50, retry_s: float = 1.0):
        self.kafka, self.alerts_topic, self.maps_topic = kafka, alerts_topic, maps_topic
        self.board, self.read_committed, self.backlog, self.retry_s = board, read_committed, backlog, retry_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ama-view-tail", daemon=True)

    def start(self) -> "AlertTail":
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                consumer = _consumer(self.kafka, self.read_committed, 5.0)
            except KafkaError as exc:
                self.board.set_connection(False, f"reconnecting: broker {self.kafka.bootstrap_servers} unreachable "
                                                 f"({describe(exc)})")
                self.stop.wait(self.retry_s)
                continue
            try:
                self._follow(consumer)
            except KafkaError as exc:
                self.board.set_connection(False, f"reconnecting: {describe(exc)}")
                self.stop.wait(self.retry_s)
            finally:
                consumer.close(autocommit=False)

    def _assign(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        parts = [TopicPartition(self.alerts_topic, p) for p in sorted(consumer.partitions_for_topic(self.alerts_topic) or ())]
        maps = [TopicPartition(self.maps_topic, p) for p in sorted(consumer.partitions_for_topic(self.maps_topic) or ())] \
            if self.maps_topic else []
        consumer.assign(parts + maps)
        if parts:
            ends, starts = consumer.end_offsets(parts, timeout_ms=5000), consumer.beginning_offsets(parts, timeout_ms=5000)
            for tp in parts:
                consumer.seek(tp, max(starts[tp], ends[tp] - self.backlog))
        if maps:  # heatmaps of the backlog's alerts: a few more than the alerts
            ends = consumer.end_offsets(maps, timeout_ms=5000)
            for tp in maps:
                consumer.seek(tp, max(0, ends[tp] - 2 * self.backlog))
        return parts

    def _follow(self, consumer: KafkaConsumer) -> None:
        parts = self._assign(consumer)
        if not parts:
            self.board.set_connection(True, f"connected; waiting for topic {self.alerts_topic}")
        else:
            self.board.set_connection(True, "connected")
        guard = FetchGuard(consumer, "alert page")
        probed = time.monotonic()
        while not self.stop.is_set():
            for records in guard.poll(timeout_ms=300).values():
                for record in records:
                    self._take(record)
            if time.monotonic() - probed > PROBE_EVERY_S:
                probed = time.monotonic()
                if not parts:  # the topic may exist by now
                    return
                consumer.end_offsets(parts, timeout_ms=3000)  # raises when the broker stopped answering

    def _take(self, record) -> None:
        if isinstance(record, UnreadableRecord) or record.value is None:
            return
        if record.topic == self.maps_topic:  # the board bounds a heatmap's size
            if record.key:
                self.board.add_map(record.key.decode("utf-8", "replace"), record.value)
            return
        if len(record.value) > MAX_RECORD_BYTES:
            return
        try:
            alert = json.loads(record.value)
        except (ValueError, RecursionError):
            return
        if isinstance(alert, dict):
            self.board.add_alert(alert)


class FrameStore:
    """A frame by its topic, partition and offset, fetched from Kafka once and kept (a few), served as a
    PNG of its own size (alert regions are in its pixels). Frames are decoded with the agent's limits."""

    def __init__(self, kafka: KafkaSection, read_committed: bool = False, keep: int = 64,
                 limits: FrameLimits = FrameLimits()):
        self.kafka, self.read_committed, self.keep, self.limits = kafka, read_committed, keep, limits
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._consumer: KafkaConsumer | None = None
        self._lock = threading.Lock()

    def get(self, topic: str, partition: int, offset: int, timeout_s: float = 5.0) -> bytes | None:
        key = (topic, partition, offset)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            try:
                png = self._fetch(topic, partition, offset, timeout_s)
            except KafkaError as exc:
                log.warning("fetching frame %s[%d]@%d failed: %s", topic, partition, offset, describe(exc))
                self._reset()
                return None
            if png is not None:
                self._cache[key] = png
                while len(self._cache) > self.keep:
                    self._cache.popitem(last=False)
            return png

    def _fetch(self, topic: str, partition: int, offset: int, timeout_s: float) -> bytes | None:
        if self._consumer is None:
            self._consumer = _consumer(self.kafka, self.read_committed, timeout_s)
        tp = TopicPartition(topic, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        guard = FetchGuard(self._consumer, "alert page frames")
        while time.monotonic() < deadline:
            for record in guard.poll(timeout_ms=200, max_records=1).get(tp, []):
                if record.offset != offset or isinstance(record, UnreadableRecord):
                    return None
                return _as_png(record, self.limits)
        return None

    def _reset(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - it is being replaced
                pass
        self._consumer = None

    def close(self) -> None:
        with self._lock:
            self._reset()


def _as_png(record, limits: FrameLimits) -> bytes | None:
    try:
        image = decode_frame(record.value, FrameMeta.from_record(record).content_type, limits)
    except FrameError:
        return None
    pil = Image.fromarray(image if image.ndim == 2 or image.shape[2] != 1 else image[:, :, 0])
    out = io.BytesIO()
    pil.save(out, format="PNG")
    return out.getvalue()


_SAMPLE = re.compile(r'^(ama_ready|ama_frames_scored_total|ama_drift)(\{[^}]*\})? ([0-9.eE+-]+)$', re.M)
_CAMERA = re.compile(r'camera="((?:[^"\\]|\\.)*)"')


class HealthPoller:
    """The agent's readiness and per-camera drift, from its /readyz and /metrics, every `every_s`."""

    def __init__(self, metrics_url: str | None, board: Board, every_s: float = 5.0):
        self.url = metrics_url.rstrip("/") if metrics_url else None
        self.board, self.every_s = board, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ama-view-health", daemon=True)

    def start(self) -> "HealthPoller":
        if self.url:
            self.thread.start()
        else:
            self.board.set_health({"agent": "not watched (no --metrics-url)"})
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.board.set_health(self.read())
            self.stop.wait(self.every_s)

    def read(self) -> dict:
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=3) as response:
                text = response.read(4 << 20).decode("utf-8", "replace")
        except OSError as exc:
            return {"agent": f"unreachable ({exc})"[:300]}
        health: dict = {"agent": "reachable", "drift": {}}
        for name, labels, value in _SAMPLE.findall(text):
            if name == "ama_ready":
                health["ready"] = float(value) == 1.0
            elif name == "ama_frames_scored_total":
                health["frames_scored"] = int(float(value))
            elif name == "ama_drift" and labels:
                camera = _CAMERA.search(labels)
                if camera:
                    health["drift"][camera.group(1)] = "drifted" if float(value) == 1.0 else "ok"
        return health

