"""`ama-stream broker`: the embedded broker in the foreground, with the agent's topics created."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from kafka import KafkaAdminClient

from ama_stream.kafka_tools.broker import free_port
from ama_stream.commands.broker import parse_topics

from .conftest import REPO

pytestmark = pytest.mark.kafka


def test_broker_command_creates_topics_and_stops_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ama_stream.cli", "broker", "--port", str(port),
                             "--topics", "frames:3,alerts"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"broker listening on 127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() else "")
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        try:
            described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(["frames", "alerts"])}
        finally:
            admin.close()
        assert described == {"frames": 3, "alerts": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("text, message", [("frames:x", "must be an integer"), ("frames:0", "PARTITIONS >= 1"),
                                           (":2", "expected NAME")])
def test_bad_topic_lists_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_topics(text)


def test_topic_list_defaults_to_one_partition():
    assert parse_topics("frames:4, scores,alerts") == {"frames": 4, "scores": 1, "alerts": 1}
    assert parse_topics("") == {}


def test_broker_command_refuses_a_taken_port_before_touching_anything(bootstrap):
    """Another broker listens there: no 'listening' line, no topics created on the OTHER broker."""
    host, port = bootstrap.rsplit(":", 1)
    proc = subprocess.run([sys.executable, "-m", "ama_stream.cli", "broker", "--port", port,
                           "--topics", "should-not-exist"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "listening" not in proc.stdout
    assert f"cannot listen on {host}:{port}" in proc.stderr.strip().splitlines()[-1]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        assert "should-not-exist" not in admin.list_topics()
    finally:
        admin.close()


def test_a_broker_restarts_on_its_port_right_after_being_killed():
    """Before, the port check bound without SO_REUSEADDR: after a SIGKILL with clients connected, the
    port sat in TIME_WAIT and `ama-stream broker` refused it for about 70 s."""
    import time

    port = free_port()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "ama_stream.cli", "broker", "--port", str(port)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert f"broker listening on 127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() else "")
        return proc

    first = start()
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    admin.list_topics()
    first.kill()  # SIGKILL: no clean shutdown, connections left to the kernel
    first.wait(timeout=30)
    admin.close()
    time.sleep(0.5)
    second = start()  # at once, on the same port
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
