"""Hostile frames against the real broker: each case leaves the agent alive, loses no valid frame,
and a restart scores nothing twice (the offsets went past the bad frame)."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from kafka import KafkaProducer
from PIL import Image

from .conftest import committed_offsets, publish, random_items, read_all

pytestmark = pytest.mark.kafka


def _png(seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_oversize_headers_are_dead_lettered_not_a_poison_pill(make_topics, producer, random_checkpoint, agent_threads):
    """A valid PNG with a 1 MB camera-id, and an undecodable frame with a 1.5 MB header, between valid
    frames: before, their records exceeded the producer's limit and the agent retried them forever."""
    topics = make_topics(partitions=2)
    big_producer = KafkaProducer(bootstrap_servers=topics.bootstrap, max_request_size=8 << 20)
    good = random_items(30, "good")
    publish(producer, topics.frames, good[:15], cameras=2)
    big_producer.send(topics.frames, key=b"cam-0", value=_png(1),
                      headers=[("frame-id", b"big-camera-id"), ("camera-id", b"c" * (1 << 20))])
    big_producer.send(topics.frames, key=b"cam-1", value=b"\x89PNG not really",
                      headers=[("frame-id", b"big-junk"), ("x-junk", b"j" * (3 << 19))])
    big_producer.flush()
    big_producer.close()
    publish(producer, topics.frames, good[15:], cameras=2)

    runner = agent_threads(topics.settings(random_checkpoint, max_frames=32))
    assert runner.join() == 0
    scores = Counter(json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.scores))
    assert set(scores) == {item.frame_id for item in good} and max(scores.values()) == 1
    dead = read_all(topics.bootstrap, topics.dlq)
    assert len(dead) == 2
    for record in dead:
        headers = dict(record.headers)
        assert headers["error"].startswith(b"header-too-large: header ")
        assert sum(len(v or b"") for _, v in record.headers) < 64 * 1024  # the dead letter itself is publishable
    assert runner.agent.metrics.dead_lettered.labels(reason="header-too-large")._value.get() == 2

    committed = committed_offsets(topics.bootstrap, topics.group, topics.frames)
    assert sum(v or 0 for v in committed.values()) == 32  # committed past both bad frames
    again = agent_threads(topics.settings(random_checkpoint, idle_exit_s=3.0))  # a restart finds nothing to do
    assert again.join() == 0 and again.agent.stats.scored == 0
    assert len(read_all(topics.bootstrap, topics.scores)) == 30


def test_crafted_calibrations_on_file_and_control_topic_leave_the_agent_running(
        make_topics, producer, random_checkpoint, agent_threads, tmp_path):
    """1e999 in the free-form `source` of the watched file, and a 100k-deep JSON message without a key
    on the control topic: both made the agent exit 1. Now each is refused and the old calibration kept."""
    from ama_stream.agent.kafka_io import ensure_topics
    from ama_stream.agent.settings import KafkaSection
    from ama_stream.calibration import CalibrationFitter, Policy
    from ama_stream.scoring import Scorer

    from .conftest import wait_for

    topics = make_topics(partitions=1)
    control = f"calibrations-{topics.group}"
    ensure_topics(KafkaSection(bootstrap_servers=topics.bootstrap), {control: 1})
    items = random_items(60, "cal", seed=9)
    scorer = Scorer(random_checkpoint, "cpu")
    fitter = CalibrationFitter()
    fitter.update(scorer.score_images([i.image for i in items]).r)
    good, _ = fitter.finish(scorer.model_id, Policy("two-sided", 0.05), {"spec": "test"})
    path = tmp_path / "calibration.json"
    good.save(path)
    runner = agent_threads(topics.settings(random_checkpoint, calibration=str(path), calibration_check_s=0.05,
                                           topics={"calibration": control}, max_frames=60))
    wait_for(lambda: runner.agent.control_topic is not None, 60, "the agent")

    def refused(source: str) -> float:
        return runner.agent.metrics.registry.get_sample_value(
            "ama_calibration_reloads_total", {"source": source, "result": "refused"}) or 0.0

    text = path.read_text()
    crafted = text.replace('"source": {', '"source": {"x": 1e999, ', 1).replace('"source":{', '"source":{"x":1e999,', 1)
    assert crafted != text
    path.write_text(crafted)
    wait_for(lambda: refused("file") >= 1, 30, "the crafted file to be refused")
    producer.send(control, value=b"[" * 100_000 + b"]" * 100_000)
    producer.flush()
    wait_for(lambda: refused("topic") >= 1, 30, "the deep message to be refused")
    assert runner.agent.calibration.calibration_id == good.calibration_id
    publish(producer, topics.frames, items, cameras=1)
    assert runner.join() == 0
    scores = Counter(json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.scores))
    assert set(scores) == {i.frame_id for i in items} and max(scores.values()) == 1
    path.write_text(text)  # the operator repairs the file; a restart (control topic replayed) scores nothing again
    again = agent_threads(topics.settings(random_checkpoint, calibration=str(path), topics={"calibration": control},
                                          idle_exit_s=3.0))
    assert again.join() == 0 and again.agent.stats.scored == 0
    assert again.agent.calibration.calibration_id == good.calibration_id


def _peak_rss_mb(args: list[str]) -> tuple[int, float]:
    """(exit code, peak RSS in MiB) of `ama-stream ARGS` run as the only child of a wrapper process."""
    import subprocess
    import sys

    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "ama_stream.cli", *args],
                          capture_output=True, text=True, timeout=600)
    rc, kib = proc.stdout.split()[-2:]
    return int(rc), int(kib) / 1024


def test_a_batch_of_huge_frames_stays_within_memory(make_topics, producer, random_checkpoint):
    """The issue's case: 64 frames of 4096x4096 RGBA zeros (65 KB each as PNG, within the per-frame
    pixel limit) in one micro-batch are 4 GiB decoded. The batch's pixel budget (default 256 Mi
    pixels) decodes the first 16 and dead-letters the rest, values kept, before decompression; each
    decoded frame is fitted to the model at once. Peak RSS grows by less than 400 MiB over the same
    run with 64 small frames, and a restart scores nothing again."""
    out = io.BytesIO()
    Image.fromarray(np.zeros((4096, 4096, 4), dtype=np.uint8), mode="RGBA").save(out, format="PNG")
    huge = out.getvalue()
    peaks = {}
    serve = ["--max-batch", "64", "--max-wait-ms", "10000", "--metrics-port", "0", "--device", "cpu"]
    for kind in ("small", "huge"):
        topics = make_topics(partitions=1)
        for i in range(64):
            producer.send(topics.frames, key=b"cam", value=huge if kind == "huge" else _png(i),
                          headers=[("frame-id", f"{kind}-{i}".encode())])
        producer.flush()
        rc, peaks[kind] = _peak_rss_mb(["serve", *topics.serve_args(random_checkpoint), "--max-frames", "64", *serve])
        assert rc == 0
        scores, dead = read_all(topics.bootstrap, topics.scores), read_all(topics.bootstrap, topics.dlq, timeout=10)
        if kind == "small":
            assert len(scores) == 64 and not dead
            continue
        assert len(scores) + len(dead) == 64 and len(scores) >= 16
        assert {dict(r.headers)["error"].split(b":")[0] for r in dead} == {b"batch-too-many-pixels"}
        assert all(r.value == huge for r in dead)  # replayable
        rc, _ = _peak_rss_mb(["serve", *topics.serve_args(random_checkpoint), "--idle-exit-s", "3", *serve])
        assert rc == 0
        assert len(read_all(topics.bootstrap, topics.scores, timeout=10)) == len(scores)  # committed past all 64
    print(f"peak RSS (MiB): {peaks}")
    assert peaks["huge"] - peaks["small"] < 400, peaks


def test_readiness_falls_when_frames_wait_and_no_commit_moves(make_topics, producer, random_checkpoint, agent_threads,
                                                              monkeypatch):
    """The broker answers every probe, but publishing never completes (a stuck path, as the poison pill
    was): /readyz and ama_ready must not say 200/1 while frames pile up uncommitted."""
    import threading

    from ama_stream.agent import publish as publish_module

    from .conftest import wait_for

    released = threading.Event()

    def stuck_wait(self, sent, heartbeat=lambda: None):
        while not self.stop.is_set() and not released.is_set():
            heartbeat()
            self.stop.wait(0.05)
        return False

    monkeypatch.setattr(publish_module.Publisher, "wait", stuck_wait)
    topics = make_topics(partitions=1)
    publish(producer, topics.frames, random_items(20, "stuck"), cameras=1)
    runner = agent_threads(topics.settings(random_checkpoint, metrics={"port": 0, "commit_stall_s": 1.0},
                                           retry={"lag_every_s": 0.2}))
    wait_for(lambda: runner.agent.metrics.commit_stalls._value.get() >= 1, 60, "the commit stall to be noticed")
    ready, reason = runner.agent.health.readiness()
    assert not ready and reason.startswith("no commit progress for") and "while work waits" in reason
    assert runner.agent.metrics.ready._value.get() == 0
    runner.agent.stop()
    released.set()
    runner.join()


def test_hostile_config_env_and_digits_refused_then_a_clean_run_scores_each_frame_once(
        make_topics, producer, random_checkpoint, tmp_path):
    """The smaller cases through `serve` itself: a 389-byte YAML alias bomb in --config (before: a
    MemoryError, then a hang ignoring SIGTERM) and a misspelled top-level env var (before: silently
    ignored) each end serve at once with one line naming the file / variable, having consumed
    nothing; frames whose captured-at holds non-ASCII digits are scored (the header is ignored, not
    read as 333). Then a clean run scores every frame once and a restart scores none again."""
    import os
    import subprocess
    import sys

    topics = make_topics(partitions=2)
    good = random_items(12, "ok")
    publish(producer, topics.frames, good, cameras=2)
    for i, digits in enumerate(["٣٣٣", "１２３"]):
        producer.send(topics.frames, key=b"cam-0", value=_png(40 + i),
                      headers=[("frame-id", f"digits-{i}".encode()), ("captured-at", digits.encode())])
    producer.flush()
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)))
    base = [sys.executable, "-m", "ama_stream.cli", "serve", *topics.serve_args(random_checkpoint), "--metrics-port", "0"]

    def serve(*extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=180,
                              env={**os.environ, **(env or {})})

    refused = serve("--config", str(bomb))
    assert refused.returncode != 0
    assert "bomb.yaml" in refused.stderr.strip().splitlines()[-1] and "alias" in refused.stderr
    refused = serve(env={"AMA_GROUPID": "x"})
    assert refused.returncode != 0 and "AMA_GROUPID" in refused.stderr.strip().splitlines()[-1]
    assert not any(committed_offsets(topics.bootstrap, topics.group, topics.frames).values())

    assert serve("--max-frames", "14").returncode == 0
    expected = {item.frame_id for item in good} | {"digits-0", "digits-1"}
    scores = Counter(json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.scores))
    assert set(scores) == expected and max(scores.values()) == 1
    assert serve("--idle-exit-s", "3").returncode == 0
    assert len(read_all(topics.bootstrap, topics.scores)) == 14
