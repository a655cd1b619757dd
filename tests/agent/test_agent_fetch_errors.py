"""What plants' producers send that the Kafka client itself chokes on: compressed batches in every
standard codec, a header name that is not UTF-8, a batch whose CRC fails. Each case leaves the
agent serving every other frame; unreadable records are dead-lettered (never lost silently) and
committed past, so a restart does not meet them again. The control topic gets the same treatment
and can never wedge the loop."""
from __future__ import annotations

import contextlib
import json
import struct
import time
from collections import Counter

import pytest
from kafka import KafkaProducer
from kafka.errors import CorruptRecordError, KafkaConnectionError
from kafka.record import default_records
from kafka.structs import TopicPartition

from ama_stream.agent.fetch_guard import FetchGuard, UnreadableRecord
from ama_stream.agent.kafka_io import available_codecs, ensure_topics
from ama_stream.agent.settings import KafkaSection

from .conftest import committed_offsets, publish, random_items, read_all, wait_for

pytestmark = pytest.mark.kafka

CODECS = ("gzip", "snappy", "lz4", "zstd")
BAD_NAME_MARK = b"BADNAME1"


@contextlib.contextmanager
def hostile_batches(kind: str):
    """While active, record batches kafka-python builds are spoiled as librdkafka/Java producers or a
    broken disk can spoil them: `header` turns the header name BADNAME1 into bytes that are not UTF-8
    (the CRC recomputed, so only the name is wrong); `crc` writes a wrong CRC."""
    build = default_records.DefaultRecordBatchBuilder.build

    def spoiled(self):
        buf = build(self)
        if kind == "header":
            at = bytes(buf).find(BAD_NAME_MARK)
            assert at >= 0, "send uncompressed batches with a BADNAME1 header"
            buf[at:at + 2] = b"\xff\xfe"
            self.write_header(False)  # a valid CRC over the spoiled bytes
        else:
            struct.pack_into(">I", buf, self.CRC_OFFSET, 0xDEADBEEF)
        return buf

    default_records.DefaultRecordBatchBuilder.build = spoiled
    try:
        yield
    finally:
        default_records.DefaultRecordBatchBuilder.build = build


def send_spoiled(bootstrap: str, topic: str, kind: str, frame_ids: list[str], partition: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    try:
        with hostile_batches(kind):
            for frame_id in frame_ids:
                producer.send(topic, value=b"\x89PNG spoiled", partition=partition,
                              headers=[(BAD_NAME_MARK.decode(), b"x"), ("frame-id", frame_id.encode())])
            producer.flush()
    finally:
        producer.close(timeout=5)


def test_every_codec_is_available():
    assert available_codecs() == ["gzip", "snappy", "lz4", "zstd"]


def test_frames_in_every_codec_are_scored(make_topics, producer, random_checkpoint, agent_threads):
    """8 frames uncompressed and 8 in each codec: all 40 scored, none dead-lettered."""
    topics = make_topics(partitions=2)
    items = random_items(40, "codec")
    publish(producer, topics.frames, items[:8], cameras=2)
    for i, codec in enumerate(CODECS, start=1):
        compressed = KafkaProducer(bootstrap_servers=topics.bootstrap, compression_type=codec, linger_ms=50)
        publish(compressed, topics.frames, items[8 * i:8 * (i + 1)], cameras=2)
        compressed.close(timeout=5)
    runner = agent_threads(topics.settings(random_checkpoint, max_frames=40))
    assert runner.join() == 0
    scores = Counter(json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.scores))
    assert set(scores) == {item.frame_id for item in items} and max(scores.values()) == 1
    assert read_all(topics.bootstrap, topics.dlq) == []


def test_unreadable_records_are_dead_lettered_and_every_other_frame_scored_across_a_restart(
        make_topics, producer, random_checkpoint, agent_threads):
    """Frames, then on partition 0 two records with a non-UTF-8 header name and one batch failing its
    CRC, then frames: every frame is scored once, the three bad offsets are dead-lettered with their
    place and reason, the offsets are committed past them, and a restart finds nothing to do."""
    topics = make_topics(partitions=2)
    good = random_items(40, "good")
    publish(producer, topics.frames, good[:20], cameras=2)
    send_spoiled(topics.bootstrap, topics.frames, "header", ["bad-name-1", "bad-name-2"], partition=0)
    send_spoiled(topics.bootstrap, topics.frames, "crc", ["bad-crc"], partition=0)
    publish(producer, topics.frames, good[20:], cameras=2)

    runner = agent_threads(topics.settings(random_checkpoint, max_frames=43))
    assert runner.join() == 0
    scores = Counter(json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.scores))
    assert set(scores) == {item.frame_id for item in good} and max(scores.values()) == 1
    dead = read_all(topics.bootstrap, topics.dlq)
    assert len(dead) == 3
    errors = sorted(dict(r.headers)["error"].decode() for r in dead)
    assert all(e.startswith("corrupt-record: ") for e in errors)
    assert sum("crc" in e for e in errors) == 1 and sum("UnicodeDecodeError" in e for e in errors) == 2
    places = {(dict(r.headers)["source-partition"], dict(r.headers)["source-offset"]) for r in dead}
    assert len(places) == 3 and {p for p, _ in places} == {b"0"}
    metrics = runner.agent.metrics
    assert metrics.fetch_errors.labels(reason="corrupt-record")._value.get() == 3
    assert metrics.dead_lettered.labels(reason="corrupt-record")._value.get() == 3

    committed = committed_offsets(topics.bootstrap, topics.group, topics.frames)
    assert sum(v or 0 for v in committed.values()) == 43
    again = agent_threads(topics.settings(random_checkpoint, idle_exit_s=3.0))
    assert again.join() == 0 and again.agent.stats.scored == 0 and again.agent.stats.dead_lettered == 0


def test_an_unreadable_control_message_neither_wedges_nor_stops_the_agent(
        make_topics, producer, random_checkpoint, agent_threads, bootstrap):
    """Before: the calibration topic's consumer spun for ever on such a record, scoring stopped and
    stop() was never honoured. Now it is skipped, frames flow, and stop() ends the agent promptly."""
    topics = make_topics(partitions=1)
    control = f"{topics.frames}-control"
    ensure_topics(KafkaSection(bootstrap_servers=bootstrap), {control: 1})
    runner = agent_threads(topics.settings(random_checkpoint, topics={"calibration": control},
                                           calibration_check_s=0.1))
    wait_for(lambda: runner.agent.control_topic is not None and runner.agent.readiness.ready, 60, "the agent to start")
    send_spoiled(bootstrap, control, "header", ["bad-control"], partition=0)
    items = random_items(10, "after-control")
    publish(producer, topics.frames, items, cameras=1)
    wait_for(lambda: runner.agent.stats.scored == 10, 60, "the frames after the bad control message")
    assert runner.agent.metrics.fetch_errors.labels(reason="corrupt-record")._value.get() == 1
    assert runner.agent.readiness.ready
    started = time.monotonic()
    runner.agent.stop()
    assert runner.join(timeout=30) == 0
    assert time.monotonic() - started < 15


class _FailingConsumer:
    """A consumer whose poll fails `failures` times with an error that names no record."""

    def __init__(self, failures: int):
        self.failures = failures
        self.polls = 0

    def poll(self, timeout_ms=0, max_records=None):
        self.polls += 1
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("broker went away mid-fetch")
        return {TopicPartition("t", 0): ["a record"]}

    def assignment(self):
        return {TopicPartition("t", 0)}


def test_an_error_naming_no_record_is_reported_paused_on_and_retried():
    consumer, seen, pauses = _FailingConsumer(failures=3), [], []
    guard = FetchGuard(consumer, "test consumer", lambda reason, located: seen.append((reason, located)),
                       sleep=pauses.append)
    for _ in range(3):
        assert guard.poll(timeout_ms=200) == {}
    assert seen == [("fetch-error", False)] * 3 and len(pauses) == 3 and all(0 < p <= 0.5 for p in pauses)
    assert guard.poll(timeout_ms=200) == {TopicPartition("t", 0): ["a record"]}


def test_a_crc_error_is_located_from_its_message_when_the_fetcher_holds_nothing():
    """kafka-python's CRC message names the partition and offset; the guard uses it when the fetcher's
    next-in-line records are gone."""
    tp = TopicPartition("frames-x", 3)

    class Consumer:
        sought = None

        def poll(self, timeout_ms=0, max_records=None):
            raise CorruptRecordError(f"Record batch for partition {tp} at offset 17 failed crc check")

        def assignment(self):
            return {tp}

        def seek(self, partition, offset):
            self.sought = (partition, offset)

    consumer = Consumer()
    polled = FetchGuard(consumer, "test consumer").poll()
    (record,) = polled[tp]
    assert isinstance(record, UnreadableRecord) and (record.offset, record.reason) == (17, "corrupt-record")
    assert consumer.sought == (tp, 18)


def test_a_gzip_bomb_is_dead_lettered_without_inflating_it_across_a_restart(make_topics, producer, random_checkpoint):
    """One gzip record, 256 MiB of zeros in a ~0.25 MiB batch, between frames:
    before, kafka-python inflated it whole (the issue's 1 GiB bomb took the agent from 742 to 3575 MiB).
    Now it stops at limits.max_inflated_batch_bytes: the bomb's offset is dead-lettered `too-large`, the
    other frames are scored, and peak RSS stays within 200 MiB of a run without the bomb."""
    from .test_agent_hostile import _peak_rss_mb

    peaks = {}
    serve = ["--max-wait-ms", "200", "--metrics-port", "0", "--device", "cpu"]
    for kind in ("plain", "bomb"):
        topics = make_topics(partitions=1)
        items = random_items(10, f"around-{kind}")
        publish(producer, topics.frames, items[:5], cameras=1)
        if kind == "bomb":
            bomber = KafkaProducer(bootstrap_servers=topics.bootstrap, compression_type="gzip", linger_ms=0,
                                   max_request_size=1 << 30)
            bomber.send(topics.frames, key=b"cam-0", value=bytes(256 << 20), headers=[("frame-id", b"bomb")])
            bomber.flush()
            bomber.close(timeout=5)
        publish(producer, topics.frames, items[5:], cameras=1)
        n = 11 if kind == "bomb" else 10
        rc, peaks[kind] = _peak_rss_mb(["serve", *topics.serve_args(random_checkpoint), "--max-frames", str(n), *serve])
        assert rc == 0
        scores = {json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.scores)}
        assert scores == {item.frame_id for item in items}
        if kind == "bomb":
            (dead,) = read_all(topics.bootstrap, topics.dlq, timeout=10)
            assert dict(dead.headers)["error"].startswith(b"too-large: ") and dead.value in (b"", None)
            rc, _ = _peak_rss_mb(["serve", *topics.serve_args(random_checkpoint), "--idle-exit-s", "3", *serve])
            assert rc == 0 and len(read_all(topics.bootstrap, topics.scores)) == 10  # committed past the bomb
    print(f"peak RSS (MiB): {peaks}")
    assert peaks["bomb"] - peaks["plain"] < 200, peaks
