"""Calibration with a real broker: calibrate from a topic, hot reload in the running agent (file and
control topic), refused calibrations, per-camera entries and drift."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from ama_stream.kafka_tools.feed import FeedItem
from ama_stream.agent.frames import PNG, encode_frame
from ama_stream.agent.kafka_io import ensure_topics
from ama_stream.agent.settings import KafkaSection
from ama_stream.calibration import (
    Calibration,
    CalibrationFitter,
    Policy,
    content_id,
    load_calibration,
)
from ama_stream.scoring import Scorer

from .conftest import committed_offsets, publish, random_items, read_all, wait_for

pytestmark = pytest.mark.kafka


def r_scores(checkpoint: Path, items: list[FeedItem]) -> np.ndarray:
    return Scorer(checkpoint, "cpu").score_images([item.image for item in items]).r


def fit(model_id: str, r: np.ndarray, policy: Policy, cameras: list[str | None] | None = None,
        per_camera: bool = False) -> Calibration:
    fitter = CalibrationFitter(per_camera=per_camera)
    fitter.update(r, cameras)
    return fitter.finish(model_id, policy, {"spec": "test"}, min_camera_frames=10)[0]


def reloads(runner, result: str, source: str = "file") -> float:
    value = runner.agent.metrics.registry.get_sample_value(
        "ama_calibration_reloads_total", {"source": source, "result": result})
    return value or 0.0


def scores_by_frame(topics) -> dict[str, dict]:
    records = [json.loads(r.value) for r in read_all(topics.bootstrap, topics.scores)]
    counts = Counter(r["frame_id"] for r in records)
    assert max(counts.values()) == 1, "a frame was scored twice"
    return {r["frame_id"]: r for r in records}


# --------------------------------------------------------------------------- calibrate --source kafka:TOPIC


def test_calibrate_from_a_topic_per_camera_without_committing_offsets(make_topics, producer, random_checkpoint,
                                                                      cli_main, tmp_path, capsys):
    topics = make_topics(partitions=2)
    control = f"calibrations-{topics.group}"
    ensure_topics(KafkaSection(bootstrap_servers=topics.bootstrap), {control: 1})
    items = random_items(240, "cal")
    publish(producer, topics.frames, items, cameras=3)
    out = tmp_path / "cal.json"
    code = cli_main(["calibrate", "--checkpoint", str(random_checkpoint), "--source", f"kafka:{topics.frames}",
                     "--bootstrap", topics.bootstrap, "--out", str(out), "--per-camera", "--min-camera-frames", "50",
                     "--target-fpr", "0.05", "--device", "cpu", "--publish", control])
    assert code == 0
    stdout = capsys.readouterr().out
    scorer = Scorer(random_checkpoint, "cpu")
    calibration = load_calibration(out, scorer.model_id)
    assert calibration.global_entry.n == 240 and set(calibration.cameras) == {"cam-0", "cam-1", "cam-2"}
    r = r_scores(random_checkpoint, items)
    assert calibration.global_entry.mu == pytest.approx(r.mean(), rel=1e-9)  # PNG round trip is lossless
    cam1 = r[1::3]  # publish() round-robins the cameras
    assert calibration.cameras["cam-1"].n == 80 and calibration.cameras["cam-1"].mu == pytest.approx(cam1.mean(), rel=1e-9)
    assert calibration.source["spec"] == f"kafka:{topics.frames}" and "n=240" in stdout
    # calibrate read outside the agent's consumer group: the agent still starts from the first frame
    assert set(committed_offsets(topics.bootstrap, topics.group, topics.frames).values()) == {None}
    [published] = read_all(topics.bootstrap, control)  # --publish: the same document, keyed by the model id
    assert published.key == scorer.model_id.encode() and published.value == out.read_bytes()


def test_calibrate_from_a_topic_by_time_window_and_limit(make_topics, producer, random_checkpoint, cli_main, tmp_path):
    topics = make_topics(partitions=1)
    old, recent = random_items(50, "old", seed=1), random_items(30, "recent", seed=2)
    hour_ago = int(time.time() * 1000) - 3_600_000
    for item in old:  # frames of an hour ago, then frames of now
        producer.send(topics.frames, key=b"cam-0", value=encode_frame(item.image, PNG), timestamp_ms=hour_ago)
    producer.flush()
    publish(producer, topics.frames, recent, cameras=1)
    windowed = tmp_path / "windowed.json"
    assert cli_main(["calibrate", "--checkpoint", str(random_checkpoint), "--source", f"kafka:{topics.frames}",
                     "--bootstrap", topics.bootstrap, "--out", str(windowed), "--window-s", "600",
                     "--target-fpr", "0.1", "--device", "cpu"]) == 0
    entry = load_calibration(windowed, None).global_entry
    assert entry.n == 30 and entry.mu == pytest.approx(r_scores(random_checkpoint, recent).mean(), rel=1e-9)
    # --limit beyond what the topic holds: waits for live frames, gives up after the idle timeout
    limited = tmp_path / "limited.json"
    assert cli_main(["calibrate", "--checkpoint", str(random_checkpoint), "--source", f"kafka:{topics.frames}",
                     "--bootstrap", topics.bootstrap, "--out", str(limited), "--limit", "100", "--idle-timeout-s", "1",
                     "--target-fpr", "0.1", "--device", "cpu"]) == 0
    assert load_calibration(limited, None).global_entry.n == 80


def test_calibrate_from_a_missing_topic_fails_with_one_line(bootstrap, random_checkpoint, cli_main, tmp_path, capsys):
    code = cli_main(["calibrate", "--checkpoint", str(random_checkpoint), "--source", "kafka:no-such-topic-x1",
                     "--bootstrap", bootstrap, "--out", str(tmp_path / "c.json"), "--device", "cpu"])
    assert code == 1
    assert "topic 'no-such-topic-x1' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_calibrate_from_an_unreachable_broker_fails_with_one_line(random_checkpoint, cli_main, tmp_path, capsys):
    from ama_stream.kafka_tools.broker import free_port

    code = cli_main(["calibrate", "--checkpoint", str(random_checkpoint), "--source", "kafka:frames",
                     "--bootstrap", f"127.0.0.1:{free_port()}", "--connect-timeout-s", "1",
                     "--out", str(tmp_path / "c.json"), "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: reading topic 'frames' from 127.0.0.1:" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "c.json").exists()


# --------------------------------------------------------------------------- hot reload


def test_hot_reload_mid_stream_changes_decisions_without_losing_or_rescoring_frames(
        make_topics, producer, random_checkpoint, agent_threads, tmp_path):
    topics = make_topics(partitions=2)
    first, second = random_items(300, "one", seed=3), random_items(300, "two", seed=4)
    model_id = Scorer(random_checkpoint, "cpu").model_id
    r = r_scores(random_checkpoint, first + second)
    quiet = fit(model_id, r, Policy.make("sigma", k=1000.0))  # never alerts
    loud = fit(model_id, r, Policy("upper", 0.3))  # alerts on 30% of these frames
    path = tmp_path / "calibration.json"
    quiet.save(path)
    runner = agent_threads(topics.settings(random_checkpoint, calibration=str(path), calibration_check_s=0.05,
                                           max_frames=600, batching={"max_batch": 16}))
    publish(producer, topics.frames, first, cameras=4)
    wait_for(lambda: runner.agent.stats.scored >= 100, 120, "the first frames to be scored")
    loud.save(path)  # while the agent works through the rest of the first 300
    wait_for(lambda: runner.agent.calibration.calibration_id == loud.calibration_id, 60, "the new calibration")
    publish(producer, topics.frames, second, cameras=4)
    assert runner.join() == 0

    scores = scores_by_frame(topics)
    assert set(scores) == {item.frame_id for item in first + second}  # nothing lost, nothing twice
    by_id = {quiet.calibration_id: quiet, loud.calibration_id: loud}
    used = Counter(s["calibration_id"] for s in scores.values())
    assert set(used) == set(by_id) and used[quiet.calibration_id] >= 100
    assert all(scores[item.frame_id]["calibration_id"] == loud.calibration_id for item in second)
    for s in scores.values():  # each record is exactly the decision of the calibration it names
        d = by_id[s["calibration_id"]].decide(np.array([s["r_score"]]))
        assert (s["anomaly"], s["threshold"]) == (bool(d.anomaly[0]), float(d.threshold[0]))
        assert s["z"] == pytest.approx(d.z[0]) and s["p_value"] == pytest.approx(d.p_value[0])
    assert not any(s["anomaly"] for s in scores.values() if s["calibration_id"] == quiet.calibration_id)
    assert sum(s["anomaly"] for s in scores.values()) > 50
    # per partition the switch happens once, between batches: old calibration first, then the new one
    sequences = defaultdict(list)
    for s in sorted(scores.values(), key=lambda s: (s["partition"], s["offset"])):
        sequences[s["partition"]].append(s["calibration_id"])
    for ids in sequences.values():
        switch = ids.index(loud.calibration_id)
        assert set(ids[:switch]) <= {quiet.calibration_id} and set(ids[switch:]) == {loud.calibration_id}
    assert reloads(runner, "ok") == 1


def test_bad_calibrations_are_refused_and_the_old_one_stays(make_topics, producer, random_checkpoint, agent_threads,
                                                            tmp_path, caplog):
    topics = make_topics(partitions=1)
    items = random_items(120, "keep", seed=5)
    model_id = Scorer(random_checkpoint, "cpu").model_id
    r = r_scores(random_checkpoint, items)
    good = fit(model_id, r, Policy("two-sided", 0.05))
    better = fit(model_id, r, Policy("upper", 0.2))
    path = tmp_path / "calibration.json"
    good.save(path)
    runner = agent_threads(topics.settings(random_checkpoint, calibration=str(path), calibration_check_s=0.05,
                                           max_frames=120))
    wait_for(lambda: runner.agent.metrics_port, 60, "the agent")

    def sigma_zero(payload: dict) -> bytes:
        payload["global"]["sigma"] = 0.0
        payload["calibration_id"] = content_id({k: v for k, v in payload.items() if k != "calibration_id"})
        return json.dumps(payload).encode()

    better_bytes = better.to_json_bytes()
    bad_versions = [
        ("corrupt", b"\x00\x01garbage" * 10, "corrupt or truncated"),
        ("other model", fit("another-model-id", r, Policy("two-sided", 0.05)).to_json_bytes(),
         f"calibration is for model another-model-id, not for this checkpoint's model {model_id}"),
        ("sigma <= 0", sigma_zero(json.loads(good.to_json_bytes())), "sigma must be a finite number > 0"),
        ("truncated", better_bytes[: len(better_bytes) // 2], "corrupt or truncated"),  # a writer caught half-way
    ]
    with caplog.at_level(logging.ERROR, logger="ama_stream.agent.runner"):
        for refused, (what, data, message) in enumerate(bad_versions, start=1):
            path.write_bytes(data)  # in place, not atomic: the agent may read it at any moment
            wait_for(lambda: reloads(runner, "refused") >= refused, 30, f"the {what} calibration to be refused")
            assert runner.agent.calibration.calibration_id == good.calibration_id, what
            assert message in caplog.text and f"keeping {good.calibration_id}" in caplog.text, what
    publish(producer, topics.frames, items[:60], cameras=2)
    wait_for(lambda: runner.agent.stats.scored >= 60, 120, "frames scored under the kept calibration")
    path.write_bytes(better_bytes)  # the writer finishes: now it is whole and valid
    wait_for(lambda: runner.agent.calibration.calibration_id == better.calibration_id, 30, "the valid calibration")
    publish(producer, topics.frames, items[60:], cameras=2)
    assert runner.join() == 0
    scores = scores_by_frame(topics)
    assert {scores[i.frame_id]["calibration_id"] for i in items[:60]} == {good.calibration_id}
    assert {scores[i.frame_id]["calibration_id"] for i in items[60:]} == {better.calibration_id}
    assert reloads(runner, "refused") == 4 and reloads(runner, "ok") == 1


def test_a_bad_calibration_file_at_start_up_is_an_error(random_checkpoint, make_topics, tmp_path):
    from ama_stream.agent.runner import Agent
    from ama_stream.calibration import CalibrationError

    path = tmp_path / "calibration.json"
    path.write_text("{")
    with pytest.raises(CalibrationError, match=f"{path}: corrupt or truncated calibration JSON"):
        Agent(make_topics().settings(random_checkpoint, calibration=str(path)))


def test_calibrations_from_the_control_topic(make_topics, producer, random_checkpoint, agent_threads, tmp_path):
    topics = make_topics(partitions=1)
    control = f"calibrations-{topics.group}"
    ensure_topics(KafkaSection(bootstrap_servers=topics.bootstrap), {control: 1})
    items = random_items(80, "ctl", seed=6)
    model_id = Scorer(random_checkpoint, "cpu").model_id
    r = r_scores(random_checkpoint, items)
    pushed = fit(model_id, r, Policy("upper", 0.25))
    runner = agent_threads(topics.settings(random_checkpoint, topics={"calibration": control},
                                           calibration_check_s=0.05, max_frames=80))
    wait_for(lambda: runner.agent.control_topic is not None, 60, "the control topic consumer")
    start_id = runner.agent.calibration.calibration_id
    assert start_id.startswith("checkpoint:")
    # another model's calibration keyed with its model id: not for this agent, skipped silently
    producer.send(control, key=b"another-model", value=fit("another-model", r, Policy()).to_json_bytes())
    # unkeyed, but for another model: refused
    producer.send(control, value=fit("another-model", r, Policy()).to_json_bytes())
    producer.send(control, key=model_id.encode(), value=b"not json")
    producer.send(control, key=model_id.encode(), value=pushed.to_json_bytes())
    producer.flush()
    wait_for(lambda: runner.agent.calibration.calibration_id == pushed.calibration_id, 60, "the pushed calibration")
    assert reloads(runner, "refused", "topic") == 2 and reloads(runner, "ok", "topic") == 1
    publish(producer, topics.frames, items, cameras=1)
    assert runner.join() == 0
    assert {s["calibration_id"] for s in scores_by_frame(topics).values()} == {pushed.calibration_id}


# --------------------------------------------------------------------------- per-camera entries and drift


def test_per_camera_entries_apply_to_their_cameras_only(make_topics, producer, random_checkpoint, agent_threads,
                                                         tmp_path):
    topics = make_topics(partitions=2)
    items = random_items(160, "cams", seed=7)
    model_id = Scorer(random_checkpoint, "cpu").model_id
    r = r_scores(random_checkpoint, items)
    policy = Policy("two-sided", 0.01)
    global_entry = fit(model_id, r, policy).global_entry
    shifted = fit(model_id, r + 50 * r.std(), policy).global_entry  # cam-0's entry: these frames look 50 sigma low
    calibration = Calibration(model_id, global_entry, policy, {"cam-0": shifted}, source={"spec": "test"})
    path = tmp_path / "calibration.json"
    calibration.save(path)
    runner = agent_threads(topics.settings(random_checkpoint, calibration=str(path), max_frames=160))
    publish(producer, topics.frames, items, cameras=4)
    assert runner.join() == 0
    scores = scores_by_frame(topics)
    for i, item in enumerate(items):
        s = scores[item.frame_id]
        camera = f"cam-{i % 4}"
        entry = shifted if camera == "cam-0" else global_entry
        assert s["camera_id"] == camera
        # float32 R depends on how frames were batched (~1e-6 of z); the entries differ by 50 sigma
        assert s["z"] == pytest.approx((r[i] - entry.mu) / entry.sigma, rel=1e-5, abs=1e-4)
        assert s["threshold"] == calibration.rule(camera).threshold
        if camera == "cam-0":
            assert s["anomaly"]
    assert sum(scores[item.frame_id]["anomaly"] for i, item in enumerate(items) if i % 4) <= 6


def test_drift_of_one_camera_is_reported_by_metric_and_log(make_topics, producer, random_checkpoint, agent_threads,
                                                           tmp_path, caplog):
    topics = make_topics(partitions=2)
    rng = np.random.default_rng(8)
    normal = [FeedItem(f"n-{i}", rng.integers(0, 256, (28, 28), dtype=np.uint8), False, "") for i in range(400)]
    model_id = Scorer(random_checkpoint, "cpu").model_id
    calibration = fit(model_id, r_scores(random_checkpoint, normal), Policy("two-sided", 0.01))
    path = tmp_path / "calibration.json"
    calibration.save(path)
    # cam-0 keeps sending frames like the calibration's; cam-1's get darker (a lamp failing)
    live = []
    for i in range(240):
        image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        live.append(FeedItem(f"live-{i}", image if i % 2 == 0 else (image * 0.97).astype(np.uint8), False, ""))
    runner = agent_threads(topics.settings(random_checkpoint, calibration=str(path), max_frames=240,
                                           drift={"window": 100, "min_frames": 50}))
    with caplog.at_level(logging.WARNING, logger="ama_stream.agent.runner"):
        publish(producer, topics.frames, live, cameras=2)
        assert runner.join() == 0
    registry = runner.agent.metrics.registry
    assert registry.get_sample_value("ama_drift", {"camera": "cam-1"}) == 1
    assert registry.get_sample_value("ama_drift", {"camera": "cam-0"}) == 0
    assert registry.get_sample_value("ama_drift_z_mean", {"camera": "cam-1"}) > 0.5
    warnings = [rec.getMessage() for rec in caplog.records if "drifted" in rec.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"camera cam-1: scores drifted from calibration "
                                                         f"{calibration.calibration_id} (")
    assert "recalibration is due" in warnings[0]
    assert any(reason.startswith("mean z of normal frames +") for reason in runner.agent.drift.cameras["cam-1"].reasons)


def test_with_a_control_key_only_signed_control_messages_count(make_topics, producer, random_checkpoint, agent_threads,
                                                               cli_main, tmp_path, monkeypatch):
    """AMA_CONTROL_KEY: a calibration anyone writes to the topic without the key's signature is refused;
    `calibrate --publish` under the same key signs its document, and the agent takes it."""
    from ama_stream.agent.signing import SIGNATURE_HEADER, signature

    topics = make_topics(partitions=1)
    control = f"calibrations-{topics.group}"
    ensure_topics(KafkaSection(bootstrap_servers=topics.bootstrap), {control: 1})
    items = random_items(40, "signed", seed=8)
    model_id = Scorer(random_checkpoint, "cpu").model_id
    r = r_scores(random_checkpoint, items)
    forged = fit(model_id, r, Policy("upper", 0.4))
    monkeypatch.setenv("AMA_CONTROL_KEY", "line3-secret")
    runner = agent_threads(topics.settings(random_checkpoint, topics={"calibration": control}, calibration_check_s=0.05,
                                           max_frames=40))
    wait_for(lambda: runner.agent.control_topic is not None, 60, "the control topic consumer")
    producer.send(control, key=model_id.encode(), value=forged.to_json_bytes())  # no signature
    producer.send(control, key=model_id.encode(), value=forged.to_json_bytes(),
                  headers=[(SIGNATURE_HEADER, signature(b"another-key", forged.to_json_bytes()))])
    producer.flush()
    wait_for(lambda: reloads(runner, "refused", "topic") == 2, 60, "both forged calibrations to be refused")
    assert runner.agent.calibration.calibration_id.startswith("checkpoint:")
    folder = tmp_path / "good"
    folder.mkdir()
    for item in items:
        (folder / f"{item.frame_id}.png").write_bytes(encode_frame(item.image, PNG))
    assert cli_main(["calibrate", "--checkpoint", str(random_checkpoint), "--source", f"folder:{folder}",
                     "--out", str(tmp_path / "cal.json"), "--bootstrap", topics.bootstrap, "--publish", control,
                     "--device", "cpu"]) == 0
    signed = load_calibration(tmp_path / "cal.json", model_id)
    wait_for(lambda: runner.agent.calibration.calibration_id == signed.calibration_id, 60, "the signed calibration")
    publish(producer, topics.frames, items, cameras=1)
    assert runner.join() == 0
