"""Interoperability with an independent Kafka client: librdkafka (through confluent-kafka), the client
under most dashboards and connectors, produces frames in every codec for the agent and reads its
score and alert records, read_committed included, from the same broker the tests use."""
from __future__ import annotations

import json
import time

import pytest

from .conftest import random_items

ck = pytest.importorskip("confluent_kafka", reason="confluent-kafka (librdkafka) is a dev dependency")

pytestmark = pytest.mark.kafka
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def read_with_librdkafka(bootstrap: str, topic: str, n: int, timeout: float = 60.0) -> list:
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{topic}", "auto.offset.reset": "earliest",
                            "isolation.level": "read_committed", "enable.auto.commit": False,
                            "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                out.append(message)
    finally:
        consumer.close()
    return out


def test_librdkafka_frames_in_every_codec_are_scored_and_its_readers_see_the_records(
        make_topics, random_checkpoint, agent_threads):
    from ama_stream.kafka_tools.feed import frame_headers
    from ama_stream.agent.frames import PNG, encode_frame

    topics = make_topics(partitions=2)
    items = random_items(5 * len(CODECS), "rdk")
    for i, codec in enumerate(CODECS):
        producer = ck.Producer({"bootstrap.servers": topics.bootstrap, "compression.type": codec, "linger.ms": 20})
        for item in items[5 * i:5 * (i + 1)]:
            headers = frame_headers(item.frame_id, "cam-rdk", PNG, int(time.time() * 1000))
            producer.produce(topics.frames, key=b"cam-rdk", value=encode_frame(item.image, PNG), headers=headers)
        assert producer.flush(30) == 0
    runner = agent_threads(topics.settings(random_checkpoint, max_frames=len(items)))
    assert runner.join() == 0 and runner.agent.stats.dead_lettered == 0
    scores = read_with_librdkafka(topics.bootstrap, topics.scores, len(items))
    records = [json.loads(m.value()) for m in scores]
    assert sorted(r["frame_id"] for r in records) == sorted(i.frame_id for i in items)
    assert all(m.key() == b"cam-rdk" and dict(m.headers())["content-type"] == b"application/json" for m in scores)
    alerts = read_with_librdkafka(topics.bootstrap, topics.alerts, runner.agent.stats.alerts, timeout=20)
    assert len(alerts) == runner.agent.stats.alerts  # the agent's lz4 records decode in librdkafka too


def test_the_reader_command_the_demo_prints_reads_the_alerts_topic(make_topics, producer):
    """The demo ends with a kcat command for the alerts topic; run as printed (a shell), it prints the
    records, also where the installed kcat links a librdkafka older than 2.2 (Debian 12), which the
    embedded broker's replies confuse: then the command runs it on confluent-kafka's librdkafka."""
    import shutil
    import subprocess

    from training.commands.demo import librdkafka_version, reader_command

    if shutil.which("kcat") is None:
        pytest.skip("kcat is not installed (.ci/run installs it)")
    topics = make_topics(partitions=1)
    sent = [json.dumps({"frame_id": f"kc-{i}", "anomaly": True}).encode() for i in range(3)]
    for value in sent:
        producer.send(topics.alerts, value=value)
    producer.flush()
    command = reader_command(topics.bootstrap, topics.alerts)
    if librdkafka_version() < (2, 2, 0):
        assert command.startswith("LD_PRELOAD=")
    out = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == sent
