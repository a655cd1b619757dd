"""Frame envelopes, score records, dead letters, the offset book and the agent's settings."""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import yaml
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from ama_stream.agent.kafka_io import consumer_config, producer_config
from ama_stream.agent.delivery.offsets import OffsetBook
from ama_stream.agent.records import SCORE_SCHEMA, FrameMeta, dead_letter_headers, encode_record, score_record
from ama_stream.agent.settings import AgentSettings
from ama_stream.commands import serve
from ama_stream.logs import KafkaBurstFilter
from ama_stream.settings import SettingsError, load_settings, masked

from .conftest import REPO


def _record(headers=(), key=b"cam-7", offset=42, value=b"v"):
    return ConsumerRecord("frames", 3, -1, offset, 0, 0, key, value, list(headers), None, 0, 0, 0)


def test_frame_meta_reads_headers_and_falls_back():
    meta = FrameMeta.from_record(_record([("frame-id", b"f-1"), ("Camera-ID", b"cam-2"), ("captured-at", b"1700000000123"),
                                          ("content-type", b"image/png")]))
    assert (meta.frame_id, meta.camera_id, meta.captured_at, meta.content_type) == ("f-1", "cam-2", 1700000000123, b"image/png")
    assert meta.out_key == b"cam-2"
    bare = FrameMeta.from_record(_record([("captured-at", b"yesterday")]))
    assert bare.frame_id == "frames:3:42"  # topic:partition:offset
    assert bare.camera_id == "cam-7"  # the key is the camera id
    assert bare.captured_at is None  # malformed timestamps cost only the latency metric
    keyless = FrameMeta.from_record(_record(key=None))
    assert keyless.camera_id is None and keyless.out_key is None


@pytest.mark.parametrize("value", ["٣٣٣".encode(), "１２３".encode(), b"1_000", b"-5", b"12345678901234567", b"+7", b" "])
def test_captured_at_is_ascii_digits_only(value):
    """int() reads Arabic-Indic and full-width digits and underscores; a timestamp header must not."""
    assert FrameMeta.from_record(_record([("captured-at", value)])).captured_at is None
    assert FrameMeta.from_record(_record([("captured-at", b" 1700000000123 ")])).captured_at == 1700000000123


def test_score_record_schema():
    meta = FrameMeta.from_record(_record([("frame-id", b"f-1"), ("captured-at", b"5")]))
    rec = score_record(meta, r_score=1.5, z=3.5, log_a=-7.0, p_value=4.6e-4, anomaly=True, threshold=3.0,
                       model_id="m", calibration_id="c", scored_at=9)
    decoded = json.loads(encode_record(rec))
    assert decoded == {
        "schema": SCORE_SCHEMA, "frame_id": "f-1", "camera_id": "cam-7", "topic": "frames", "partition": 3,
        "offset": 42, "r_score": 1.5, "z": 3.5, "log_a": -7.0, "p_value": 4.6e-4, "anomaly": True,
        "threshold": 3.0, "model_id": "m", "calibration_id": "c", "captured_at": 5, "scored_at": 9,
    }
    nan = score_record(meta, r_score=float("nan"), z=float("inf"), log_a=0.0, p_value=0.0, anomaly=False,
                       threshold=3.0, model_id="m", calibration_id="c", scored_at=9)
    assert json.loads(encode_record(nan))["z"] is None  # never invalid JSON


def test_dead_letter_headers_keep_the_originals_and_say_why():
    meta = FrameMeta.from_record(_record([("frame-id", b"f-1"), ("x-custom", b"keep me")]))
    headers = dead_letter_headers(meta, "undecodable: garbage")
    assert headers[:2] == [("frame-id", b"f-1"), ("x-custom", b"keep me")]
    assert dict(headers[2:]) == {"error": b"undecodable: garbage", "source-topic": b"frames",
                                 "source-partition": b"3", "source-offset": b"42"}


def test_offset_book_commits_only_done_work_and_forgets_revoked_partitions():
    book = OffsetBook()
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    epoch = book.epoch()
    book.mark_done({p0: 10, p1: 5}, epoch)
    book.mark_done({p0: 7}, epoch)  # an older position never moves the offset back
    assert {tp: m.offset for tp, m in book.uncommitted().items()} == {p0: 10, p1: 5}
    book.mark_committed(book.uncommitted([p0]))
    assert set(book.uncommitted()) == {p1}
    book.revoke([p1])
    assert book.uncommitted() == {} and book.epoch() == epoch + 1
    book.mark_done({p1: 9, p0: 12}, epoch)  # polled before the revocation: p1 is not ours to commit
    assert {tp: m.offset for tp, m in book.uncommitted().items()} == {p0: 12}
    book.mark_done({p1: 15}, book.epoch())  # polled after it (p1 assigned again): committed as usual
    assert {tp: m.offset for tp, m in book.uncommitted().items()} == {p0: 12, p1: 15}


def test_settings_layers_yaml_env_flags(tmp_path, monkeypatch):
    config = tmp_path / "agent.yaml"
    config.write_text("group_id: from-yaml\nbatching: {max_batch: 16}\ntopics: {frames: cam-frames}\n")
    monkeypatch.setenv("AMA_GROUP_ID", "from-env")
    monkeypatch.setenv("AMA_BATCHING__MAX_WAIT_MS", "7")
    args = argparse.Namespace(set=["consumer.session_timeout_ms=6000"], bootstrap="h1:9092,h2:9092", checkpoint=None,
                              calibration=None, frames_topic=None, scores_topic="", alerts_topic=None, dlq_topic=None,
                              group_id="from-flag", device=None, max_batch=None, max_wait_ms=None, metrics_port=0,
                              max_frames=None, idle_exit_s=2.5)
    s = load_settings(AgentSettings, config, serve.build_overrides(args))
    assert s.group_id == "from-flag" and s.batching.max_batch == 16 and s.batching.max_wait_ms == 7
    assert s.topics.frames == "cam-frames" and s.topics.scores is None  # '' disables the scores topic
    assert s.kafka.bootstrap_servers == "h1:9092,h2:9092" and s.idle_exit_s == 2.5 and s.metrics.port == 0
    cfg = consumer_config(s)
    assert cfg["session_timeout_ms"] == 6000 and cfg["enable_auto_commit"] is False and cfg["max_poll_records"] == 16
    assert cfg["bootstrap_servers"] == ["h1:9092", "h2:9092"]


@pytest.mark.parametrize("override, message", [
    ({"consumer": {"enable_auto_commit": True}}, "consumer.enable_auto_commit is managed"),
    ({"producer": {"acks": 1}}, "producer.acks is managed"),
    ({"consumer": {"no_such_option": 1}}, "not a kafka-python consumer setting"),
    ({"kafka": {"security_protocol": "SASL_SSL"}}, "needs sasl_mechanism"),
    ({"kafka": {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}}, "needs sasl_plain_username"),
    ({"kafka": {"bootstrap_servers": "nohostport"}}, "HOST:PORT"),
    ({"topics": {"alerts": "bad topic!"}}, "topic name"),
    ({"topics": {"scores": "frames"}}, "cannot also be an output topic"),
    ({"batching": {"max_batch": 0}}, "max_batch"),
    ({"typo_key": 1}, "typo_key: unknown key"),
])
def test_settings_refuse_bad_values_in_one_line(override, message):
    with pytest.raises(SettingsError, match=message) as info:
        load_settings(AgentSettings, None, override)
    assert "\n" not in str(info.value)


def test_secrets_are_masked_and_passed_through():
    s = load_settings(AgentSettings, None, {"kafka": {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "agent",
        "sasl_plain_password": "hunter2", "ssl_password": "keypass"}})
    logged = json.dumps(masked(s.for_log()))
    assert "hunter2" not in logged and "keypass" not in logged and "agent" in logged
    assert "hunter2" not in repr(s)
    cfg = producer_config(s.kafka, s.producer, 5.0)
    assert cfg["sasl_plain_password"] == "hunter2" and cfg["ssl_password"] == "keypass" and cfg["acks"] == "all"


def test_kafka_burst_filter_passes_one_kafka_line_per_failure():
    flt = KafkaBurstFilter(interval_s=60)

    def rec(name, msg, level=logging.ERROR):
        return logging.LogRecord(name, level, __file__, 1, msg, ("x",), None)

    burst = [rec("kafka.net.manager", "Connection failed: %s"), rec("kafka.net.connection", "Connection lost: %s"),
             rec("kafka.net.manager", "Bootstrap failed: %s", logging.WARNING)]
    assert [flt.filter(r) for r in burst] == [True, False, False]
    assert burst[0].levelname == "WARNING"  # kafka-python's ERROR for what the agent retries: a warning
    assert flt.filter(rec("kafka.conn", "detail %s", logging.DEBUG))  # debug detail is not thinned
    own = rec("ama_stream.agent", "broker %s down")
    assert flt.filter(own) and flt.filter(rec("ama_stream.agent", "broker %s down")) and own.levelname == "ERROR"
    flt._burst_since -= 61  # the next failure, a minute later
    later = rec("kafka.net.manager", "Connection failed: %s")
    assert flt.filter(later) and later.getMessage() == "Connection failed: x (and 2 more kafka-python lines of the last failure)"


def test_agent_yaml_documents_every_setting_with_its_default():
    path = "configs/agent.yaml"
    raw = yaml.safe_load((REPO / path).read_text())
    loaded = load_settings(AgentSettings, REPO / path)
    defaults = AgentSettings()

    def keys(model) -> set[str]:
        out = set()
        for name in type(model).model_fields:
            value = getattr(model, name)
            out.add(name)
            if hasattr(type(value), "model_fields"):
                out |= {f"{name}.{k}" for k in keys(value)}
        return out

    def yaml_keys(data: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in data.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k not in ("consumer", "producer"):
                out |= yaml_keys(v, f"{prefix}{k}.")
        return out

    assert yaml_keys(raw) == keys(defaults)
    assert loaded.model_dump(exclude={"consumer", "producer"}) == defaults.model_dump(exclude={"consumer", "producer"})
    assert consumer_config(loaded) == consumer_config(defaults)
    assert producer_config(loaded.kafka, loaded.producer, 1) == producer_config(defaults.kafka, defaults.producer, 1)


def test_serve_and_produce_accept_the_contract_flags():
    """The documented flags of `serve`: scripts outside the project drive the agent with them."""
    from ama_stream.cli import _build_parser

    serve_args = _build_parser("serve").parse_args([
        "serve", "--config", "c.yaml", "--bootstrap", "h:1", "--checkpoint", "m.pt", "--calibration", "cal.json",
        "--frames-topic", "f", "--scores-topic", "s", "--alerts-topic", "a", "--dlq-topic", "d", "--group-id", "g",
        "--device", "cpu", "--max-batch", "8", "--max-wait-ms", "5", "--metrics-port", "9", "--max-frames", "3",
        "--idle-exit-s", "1.5"])
    assert (serve_args.max_frames, serve_args.idle_exit_s, serve_args.metrics_port) == (3, 1.5, 9)
    produce_args = _build_parser("produce").parse_args([
        "produce", "--bootstrap", "h:1", "--topic", "t", "--source", "idx:mnist", "--rate", "5", "--limit", "2",
        "--camera-id", "c"])
    assert (produce_args.rate, produce_args.limit, produce_args.camera_id) == (5.0, 2, "c")


def test_metrics_server_binds_loopback_by_default_and_names_a_taken_address():
    import socket

    from ama_stream.agent.metrics import AgentMetrics, Health, HealthServer
    from ama_stream.agent.settings import AgentSettings

    assert AgentSettings().metrics.host == "127.0.0.1"  # unauthenticated: not on every interface by default
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
            HealthServer("127.0.0.1", port, AgentMetrics(), Health(60.0))


def test_commit_progress_falls_when_frames_wait_and_commits_do_not_move():
    from ama_stream.agent.delivery.offsets import CommitProgress

    watch = CommitProgress(stall_s=60, now=0.0)
    assert watch.check(lag=0, committed=0, now=500.0) is None  # idle: nothing waits, never stalled
    assert watch.check(lag=10, committed=0, now=510.0) is None  # waiting starts the clock
    assert watch.check(lag=10, committed=0, now=569.0) is None
    reason = watch.check(lag=12, committed=0, now=571.0)
    assert reason == "no commit progress for 61 s while work waits" and watch.stalled
    assert watch.check(lag=12, committed=5, now=572.0) is None and not watch.stalled  # a commit moved: ready again


def test_a_batch_pixel_budget_below_one_frame_is_refused():
    """Else every frame between the two limits would be dead-lettered forever."""
    with pytest.raises(ValueError, match=r"max_batch_pixels \(10\) must be at least max_pixels"):
        AgentSettings(checkpoint="m.pt", limits={"max_batch_pixels": 10})
    assert AgentSettings(checkpoint="m.pt", limits={"max_pixels": 100, "max_batch_pixels": 100}).limits.max_batch_pixels == 100
