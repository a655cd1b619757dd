"""The agent against a real broker: one score per frame, dead letters, metrics, groups."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from .conftest import http_get, publish, random_items, read_all, wait_for

pytestmark = pytest.mark.kafka


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def _malformed() -> dict[str, tuple[bytes | None, list[tuple[str, bytes]]]]:
    """frame-id -> (value, headers) of every kind of bad frame the agent must dead-letter."""
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(png, format="PNG")
    png = png.getvalue()
    rng = np.random.default_rng(1)
    frames = {
        "bad-truncated-png": (png[: len(png) // 2], []),
        "bad-random-bytes": (rng.bytes(700), []),
        "bad-npy-pickle": (_npy(np.array([{"x": 1}], dtype=object), allow_pickle=True), [("content-type", b"application/x-npy")]),
        "bad-npy-float64": (_npy(rng.random((28, 28))), []),
        "bad-oversized": (_npy(np.zeros((400, 400), dtype=np.uint8)), []),  # 160 kB > the 100 kB limit below
        "bad-empty": (b"", []),
        "bad-wrong-content-type": (png, [("content-type", b"application/x-npy")]),
    }
    return {fid: (value, [("frame-id", fid.encode()), *headers]) for fid, (value, headers) in frames.items()}


def test_clean_run_scores_every_frame_once_and_dead_letters_bad_ones(make_topics, producer, random_checkpoint,
                                                                     agent_threads):
    topics = make_topics(partitions=2)
    good = random_items(120, "good")
    bad = _malformed()
    # Interleave: the bad frames sit between good ones on the same partition, so the agent must carry on.
    publish(producer, topics.frames, good[:60], cameras=2)
    for fid, (value, headers) in bad.items():
        producer.send(topics.frames, key=b"cam-0", value=value, headers=headers)
    producer.flush()
    publish(producer, topics.frames, good[60:], cameras=2, content_type="application/x-npy")

    total = len(good) + len(bad)
    runner = agent_threads(topics.settings(random_checkpoint, max_frames=total, limits={"max_frame_bytes": 100_000},
                                           batching={"max_batch": 16}))
    port = wait_for(lambda: runner.agent.metrics_port, 60, "the metrics server")
    assert runner.join() == 0

    scores = [json.loads(r.value) for r in read_all(topics.bootstrap, topics.scores)]
    counts = Counter(s["frame_id"] for s in scores)
    assert set(counts) == {item.frame_id for item in good}
    assert max(counts.values()) == 1  # a clean run: exactly one record per frame
    for s in scores:
        assert s["schema"] == "ama-stream/score/v1" and s["topic"] == topics.frames
        assert s["model_id"] == runner.agent.scorer.model_id and s["calibration_id"].startswith("checkpoint:")
        assert s["camera_id"] in ("cam-0", "cam-1") and s["captured_at"] <= s["scored_at"]
        assert s["anomaly"] == (abs(s["z"]) > s["threshold"])

    alerts = [json.loads(r.value) for r in read_all(topics.bootstrap, topics.alerts)]
    assert sorted(a["frame_id"] for a in alerts) == sorted(s["frame_id"] for s in scores if s["anomaly"])

    dead = {dict(r.headers)["frame-id"].decode(): r for r in read_all(topics.bootstrap, topics.dlq)}
    assert set(dead) == set(bad)
    for fid, record in dead.items():
        value, headers = bad[fid]
        assert record.value == value and record.key == b"cam-0"
        assert record.headers[: len(headers)] == headers  # the original headers, in order
        extra = dict(record.headers[len(headers):])
        assert extra["source-topic"].decode() == topics.frames and extra["error"]
    reasons = {fid: dict(r.headers)["error"].decode().split(":")[0] for fid, r in dead.items()}
    assert reasons == {"bad-truncated-png": "undecodable", "bad-random-bytes": "undecodable",
                       "bad-npy-pickle": "unsupported-pixels", "bad-npy-float64": "unsupported-pixels",
                       "bad-oversized": "too-large", "bad-empty": "empty", "bad-wrong-content-type": "bad-content-type"}
    stats = runner.agent.stats
    assert (stats.scored, stats.dead_lettered) == (len(good), len(bad))
    # the metrics server is down after the run; the counters it served are in the registry
    metrics = runner.agent.metrics
    assert metrics.frames._value.get() == len(good)
    assert sum(c._value.get() for c in metrics.dead_lettered._metrics.values()) == len(bad)
    assert http_get(port, "/metrics")[0] == 0


def test_metrics_and_health_endpoints_while_serving(make_topics, producer, random_checkpoint, agent_threads):
    topics = make_topics(partitions=1)
    runner = agent_threads(topics.settings(random_checkpoint, idle_exit_s=30, retry={"lag_every_s": 0.2}))
    port = wait_for(lambda: runner.agent.metrics_port, 60, "the metrics server")
    assert http_get(port, "/healthz")[0] == 200
    wait_for(lambda: http_get(port, "/readyz")[0] == 200, 60, "readiness")
    items = random_items(30, "m")
    publish(producer, topics.frames, items, cameras=1)
    wait_for(lambda: runner.agent.stats.scored == 30, 60, "30 frames scored")
    wait_for(lambda: 'ama_consumer_lag{partition="0"' in http_get(port, "/metrics")[1], 30, "the lag gauge")
    status, text = http_get(port, "/metrics")
    assert status == 200
    for name in ("ama_frames_scored_total 30.0", "ama_batch_size_count", "ama_decode_seconds_bucket",
                 "ama_score_seconds_bucket", "ama_publish_seconds_bucket", "ama_end_to_end_seconds_count 30.0",
                 "ama_ready 1.0", "ama_alerts_total"):
        assert name in text, name
    assert http_get(port, "/nope")[0] == 404
    runner.agent.stop()
    assert runner.join() == 0


def test_two_agents_in_one_group_share_partitions_and_score_everything(make_topics, producer, random_checkpoint,
                                                                        agent_threads):
    topics = make_topics(partitions=4)
    first = agent_threads(topics.settings(random_checkpoint, idle_exit_s=6))
    items = random_items(400, "two")
    publish(producer, topics.frames, items[:100], cameras=8, rate=200)
    wait_for(lambda: first.agent.stats.scored > 0, 60, "the first agent to score")
    second = agent_threads(topics.settings(random_checkpoint, idle_exit_s=6))
    # Keep frames flowing while the group rebalances onto two members.
    publish(producer, topics.frames, items[100:], cameras=8, rate=100)
    assert first.join() == 0 and second.join() == 0

    scored_ids = {json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.scores)}
    assert scored_ids == {item.frame_id for item in items}  # together, every frame
    assert first.agent.stats.scored > 0 and second.agent.stats.scored > 0  # both took a share
    assert first.agent.stats.scored + second.agent.stats.scored >= len(items)


def test_frames_that_do_not_fit_the_model_are_counted_and_reported(make_topics, producer, random_checkpoint,
                                                                   agent_threads, caplog):
    """A 64x48 colour camera against a 32x32 gray model: scored, but never without a word."""
    from ama_stream.kafka_tools.feed import FeedItem

    topics = make_topics(partitions=1)
    rng = np.random.default_rng(3)
    colour = [FeedItem(f"rgb-{i}", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), False, f"rgb#{i}") for i in range(10)]
    small = random_items(6, "gray")  # 28x28 gray: padded into 32x32, as the training loaders do
    publish(producer, topics.frames, colour + small, cameras=1)
    caplog.set_level("WARNING", logger="ama_stream.agent")
    runner = agent_threads(topics.settings(random_checkpoint, max_frames=16))
    assert runner.join() == 0
    assert runner.agent.stats.scored == 16
    counts = {labels[0]: c._value.get() for labels, c in runner.agent.metrics.frames_resized._metrics.items()}
    assert counts == {"resized": 10, "channels": 10, "padded": 6}
    warnings = [r.getMessage() for r in caplog.records if "ama_frames_resized_total" in r.getMessage()]
    assert warnings and "64x48x3" in warnings[0] and "32x32x1" in warnings[0]
