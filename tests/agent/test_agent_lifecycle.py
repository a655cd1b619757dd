"""`ama-stream serve` as a process: SIGTERM, kill -9 and restart, a broker that comes up late."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections import Counter

import pytest

from ama_stream.kafka_tools.broker import EmbeddedBroker, free_port
from ama_stream.agent.kafka_io import ensure_topics, make_producer
from ama_stream.agent.settings import KafkaSection

from .conftest import Topics, committed_offsets, http_get, publish, random_items, read_all, wait_for

pytestmark = pytest.mark.kafka


def _scores(topics: Topics) -> list[dict]:
    return [json.loads(r.value) for r in read_all(topics.bootstrap, topics.scores)]


def test_sigterm_finishes_in_flight_work_commits_and_exits_zero(make_topics, producer, random_checkpoint,
                                                                agent_processes):
    topics = make_topics(partitions=2)
    agent = agent_processes([*topics.serve_args(random_checkpoint), "--max-batch", "16"])
    wait_for(agent.ready, 120, "the agent to be ready")
    items = random_items(600, "term")
    feeder = threading.Thread(target=publish, args=(producer, topics.frames, items), kwargs={"cameras": 4, "rate": 60})
    feeder.start()  # frames keep arriving while the agent is told to stop
    try:
        wait_for(lambda: agent.scored() >= 50, 120, "50 frames scored")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    finally:
        feeder.join()
    log = agent.log()
    assert "received SIGTERM" in log and "agent stopped:" in log

    scores = _scores(topics)
    committed = committed_offsets(topics.bootstrap, topics.group, topics.frames)
    # Every frame below a committed offset has its record, and every record's frame is below one:
    # the agent published what it had taken, then committed exactly that.
    by_partition = Counter(s["partition"] for s in scores)
    for partition, offset in committed.items():
        assert (offset or 0) == by_partition.get(partition, 0)
        assert sorted(s["offset"] for s in scores if s["partition"] == partition) == list(range(offset or 0))
    assert 50 <= sum(by_partition.values()) < len(items)  # it stopped mid-stream


def test_kill_9_mid_stream_and_restart_loses_no_frame(make_topics, producer, random_checkpoint, agent_processes):
    topics = make_topics(partitions=2)
    items = random_items(600, "kill")
    publish(producer, topics.frames, items, cameras=4)
    first = agent_processes([*topics.serve_args(random_checkpoint), "--max-batch", "8"], name="first")
    wait_for(lambda: first.scored() >= 60, 120, "60 frames scored before the crash")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.wait(30)
    at_crash = committed_offsets(topics.bootstrap, topics.group, topics.frames)
    assert sum(v or 0 for v in at_crash.values()) < len(items), "the crash came too late to test anything"

    second = agent_processes([*topics.serve_args(random_checkpoint), "--idle-exit-s", "4"], name="second")
    assert second.wait(180) == 0

    scores = _scores(topics)
    counts = Counter(s["frame_id"] for s in scores)
    assert set(counts) == {item.frame_id for item in items}  # no frame lost
    for s in scores:
        if counts[s["frame_id"]] > 1:  # duplicates come only from the uncommitted tail at the crash
            assert s["offset"] >= (at_crash.get(s["partition"]) or 0)
    final = committed_offsets(topics.bootstrap, topics.group, topics.frames)
    assert sum(v or 0 for v in final.values()) == len(items)


def test_waits_for_a_broker_that_is_down_at_start(tmp_path, random_checkpoint, agent_processes):
    port = free_port()
    late = Topics("frames-late", "scores-late", "alerts-late", "dlq-late", "group-late", f"127.0.0.1:{port}")
    agent = agent_processes([*late.serve_args(random_checkpoint), "--max-frames", "40",
                             "--set", "retry.connect_timeout_s=1"])
    wait_for(lambda: agent.count("not reachable") >= 3, 120, "three failed connection attempts")
    status, reason = http_get(agent.metrics_port, "/readyz")
    assert status == 503 and reason.startswith("broker unreachable (connect: ")
    assert http_get(agent.metrics_port, "/healthz")[0] == 200  # alive, just waiting
    assert agent.proc.poll() is None

    with EmbeddedBroker(port=port, log_file=tmp_path / "late-broker.log") as broker:
        kafka = KafkaSection(bootstrap_servers=broker.bootstrap)
        ensure_topics(kafka, {late.frames: 2, late.scores: 1, late.alerts: 1, late.dlq: 1})
        producer = make_producer(kafka, {}, 10.0)
        try:
            items = random_items(40, "late")
            publish(producer, late.frames, items, cameras=2)
        finally:
            producer.close(timeout=5)
        assert agent.wait(120) == 0
        assert {json.loads(r.value)["frame_id"] for r in read_all(broker.bootstrap, late.scores)} == {i.frame_id for i in items}
    log = agent.log()
    assert "connected to" in log and "after" in log
    # Backoff, not a busy loop.
    attempts = [int(a) for a in re.findall(r"attempt (\d+),", log)]
    waits = [float(w) for w in re.findall(r"retrying in ([\d.]+) s", log)]
    assert attempts == list(range(1, len(attempts) + 1))
    for i, wait in enumerate(waits):  # 0.2 s doubling up to the 2 s cap, +-10% jitter, logged as %.1f
        expected = min(0.2 * 2**i, 2.0)
        assert 0.9 * expected - 0.05 <= wait <= 1.1 * expected + 0.05


def test_serve_gives_up_on_an_unreachable_broker_when_told_to(random_checkpoint):
    """--give-up-after-s: a broker that never comes up ends serve with a non-zero exit and one line,
    after at most one kafka-python line per failed attempt (it logs ~5 per attempt unfiltered)."""
    import subprocess
    import sys

    from ama_stream.kafka_tools.broker import free_port

    proc = subprocess.run([sys.executable, "-m", "ama_stream.cli", "serve", "--bootstrap", f"127.0.0.1:{free_port()}",
                           "--checkpoint", str(random_checkpoint), "--give-up-after-s", "1", "--device", "cpu",
                           "--set", "retry.connect_timeout_s=1", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "not reachable" in lines[-1] and "giving up (--give-up-after-s 1)" in lines[-1]
    attempts = int(lines[-1].split("(")[1].split(" attempt")[0])
    kafka_lines = [line for line in lines if " kafka." in line]
    assert 1 <= len(kafka_lines) <= attempts, lines


def test_give_up_after_s_is_honoured_even_when_one_attempt_would_take_longer(random_checkpoint):
    """--give-up-after-s 3 with the default 10 s connection attempt: before, the first attempt alone
    ran 10 s; now an attempt never outlasts the patience. A taken metrics port names the flag to change."""
    import re
    import socket
    import subprocess
    import sys

    from ama_stream.kafka_tools.broker import free_port

    proc = subprocess.run([sys.executable, "-m", "ama_stream.cli", "serve", "--bootstrap", f"127.0.0.1:{free_port()}",
                           "--checkpoint", str(random_checkpoint), "--give-up-after-s", "3", "--device", "cpu",
                           "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "giving up (--give-up-after-s 3)" in last
    assert int(re.search(r"not reachable for (\d+) s", last).group(1)) <= 4, last
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([sys.executable, "-m", "ama_stream.cli", "serve", "--bootstrap", f"127.0.0.1:{free_port()}",
                               "--checkpoint", str(random_checkpoint), "--device", "cpu",
                               "--metrics-port", str(taken.getsockname()[1])], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode != 0 and "--metrics-port" in proc.stderr.strip().splitlines()[-1]
