"""Model hot-swap with a real broker (issue 12 part 2): a new checkpoint + calibration pair swapped
in mid-stream through the watched files and through the control topic, and refused swaps. The
two models differ in weights AND input (32x32 gray vs 16x16 RGB), so a batch scored by the wrong
model would fail, and every record's R is checked against the model it names."""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from ama_stream.agent.kafka_io import ensure_topics
from ama_stream.agent.settings import KafkaSection
from ama_stream.calibration import Calibration, CalibrationFitter, Policy
from ama_stream.fileio import atomic_write_bytes
from ama_stream.scoring import Scorer

from .conftest import publish, random_items, read_all, wait_for

pytestmark = pytest.mark.kafka


def fit(model_id: str, r: np.ndarray) -> Calibration:
    fitter = CalibrationFitter()
    fitter.update(r)
    return fitter.finish(model_id, Policy("two-sided", 0.05), {"spec": "test"})[0]


def model_reloads(runner, result: str, source: str = "file") -> float:
    return runner.agent.metrics.registry.get_sample_value(
        "ama_model_reloads_total", {"source": source, "result": result}) or 0.0


def calibration_refusals(runner) -> float:
    get = runner.agent.metrics.registry.get_sample_value
    return sum(get("ama_calibration_reloads_total", {"source": s, "result": "refused"}) or 0.0 for s in ("file", "topic"))


def scores_by_frame(topics) -> dict[str, dict]:
    records = [json.loads(r.value) for r in read_all(topics.bootstrap, topics.scores)]
    counts = Counter(r["frame_id"] for r in records)
    assert max(counts.values()) == 1, "a frame was scored twice"
    return {r["frame_id"]: r for r in records}


class Models:
    """The two tiny models, their R on the test frames, and a calibration of each."""

    def __init__(self, old_checkpoint: Path, new_checkpoint: Path, items):
        self.old, self.new = Scorer(old_checkpoint, "cpu"), Scorer(new_checkpoint, "cpu")
        images = [item.image for item in items]
        self.r = {m.model_id: dict(zip((i.frame_id for i in items), m.score_images(images).r)) for m in (self.old, self.new)}
        self.old_cal = fit(self.old.model_id, np.array(list(self.r[self.old.model_id].values())))
        self.new_cal = fit(self.new.model_id, np.array(list(self.r[self.new.model_id].values())))

    def check_records(self, scores: dict[str, dict], pairs: set[tuple[str, str]]) -> None:
        """Each record names a (model, calibration) pair of `pairs`, and its R is that model's R of the frame."""
        for frame_id, s in scores.items():
            assert (s["model_id"], s["calibration_id"]) in pairs, s
            assert s["r_score"] == pytest.approx(self.r[s["model_id"]][frame_id], rel=1e-4, abs=1e-6), s


def pair_folder(folder: Path, checkpoint: Path | bytes, calibration: Calibration) -> Path:
    folder.mkdir()
    if isinstance(checkpoint, bytes):
        atomic_write_bytes(folder / "model.pt", checkpoint)
    else:
        shutil.copyfile(checkpoint, folder / "model.pt")
    calibration.save(folder / "calibration.json")
    return folder


def point(link: Path, folder: Path) -> None:
    """The operator's one-step swap of a checkpoint + calibration pair: rename a new symlink over the old."""
    tmp = link.with_name(link.name + ".next")
    tmp.symlink_to(folder.name)
    tmp.replace(link)


def test_a_model_swapped_mid_stream_scores_every_later_frame_and_no_frame_is_lost_or_scored_twice(
        make_topics, producer, random_checkpoint, other_checkpoint, agent_threads, tmp_path):
    """One run, one stream: the first half is scored by the old model, the pair is swapped while the
    agent keeps its partitions and positions, and the second half -- published only once the swap is
    counted, so frames certainly remain after it -- is scored by the new one. No timing decides the
    outcome. (Batches in flight across a swap: test_agent_reload.py, on fakes.)"""
    topics = make_topics(partitions=2)
    first, second = random_items(160, "one", seed=11), random_items(160, "two", seed=12)
    models = Models(random_checkpoint, other_checkpoint, first + second)
    current = tmp_path / "current"
    point(current, pair_folder(tmp_path / "v1", random_checkpoint, models.old_cal))
    v2 = pair_folder(tmp_path / "v2", other_checkpoint, models.new_cal)
    runner = agent_threads(topics.settings(current / "model.pt", calibration=str(current / "calibration.json"),
                                           model_reload=True, calibration_check_s=0.05, max_frames=320,
                                           batching={"max_batch": 16}))
    publish(producer, topics.frames, first, cameras=8)  # cam-0..3 all hash to partition 1; 8 use both
    wait_for(lambda: runner.agent.stats.scored >= len(first), 120, "the first half to be scored")
    assert model_reloads(runner, "loaded") == 0  # the first half is all the old model's
    point(current, v2)
    wait_for(lambda: model_reloads(runner, "loaded") == 1, 60, "the swap to be counted")
    assert runner.agent.model.model_id == models.new.model_id and runner.agent.stats.scored == len(first)
    publish(producer, topics.frames, second, cameras=8)  # the stream goes on after the swap
    assert runner.join() == 0

    scores = scores_by_frame(topics)
    assert set(scores) == {item.frame_id for item in first + second}  # nothing lost, nothing twice
    old_pair = (models.old.model_id, models.old_cal.calibration_id)
    new_pair = (models.new.model_id, models.new_cal.calibration_id)
    models.check_records(scores, {old_pair, new_pair})
    assert {scores[item.frame_id]["model_id"] for item in first} == {models.old.model_id}
    assert {scores[item.frame_id]["model_id"] for item in second} == {models.new.model_id}
    # on each partition the same consumer went on across the swap: the old model first, then the new one
    sequences = defaultdict(list)
    for s in sorted(scores.values(), key=lambda s: (s["partition"], s["offset"])):
        sequences[s["partition"]].append(s["model_id"])
    assert len(sequences) == 2
    for ids in sequences.values():
        switch = ids.index(models.new.model_id)
        assert switch > 0 and set(ids[:switch]) == {models.old.model_id} and set(ids[switch:]) == {models.new.model_id}
    assert model_reloads(runner, "loaded") == 1 and model_reloads(runner, "refused") == 0
    assert calibration_refusals(runner) == 0
    registry = runner.agent.metrics.registry
    assert registry.get_sample_value("ama_model_info", {"model_id": models.new.model_id}) == 1
    assert not read_all(topics.bootstrap, topics.dlq)


def test_refused_model_swaps_keep_the_old_model_scoring_without_losing_frames(
        make_topics, producer, random_checkpoint, other_checkpoint, agent_threads, tmp_path, caplog):
    topics = make_topics(partitions=1)
    items = random_items(90, "keep", seed=13)
    models = Models(random_checkpoint, other_checkpoint, items)
    current = tmp_path / "current"
    point(current, pair_folder(tmp_path / "v1", random_checkpoint, models.old_cal))
    mismatched = pair_folder(tmp_path / "v2", other_checkpoint, models.old_cal)  # the old model's calibration
    corrupt = pair_folder(tmp_path / "v3", b"PK\x03\x04" + b"\x00garbage" * 100, models.old_cal)
    runner = agent_threads(topics.settings(current / "model.pt", calibration=str(current / "calibration.json"),
                                           model_reload=True, calibration_check_s=0.05, max_frames=90))
    wait_for(lambda: runner.agent.metrics_port, 60, "the agent")
    old = (models.old.model_id, models.old_cal.calibration_id)
    with caplog.at_level(logging.ERROR, logger="ama_stream.agent.reload"):
        publish(producer, topics.frames, items[:30], cameras=2)
        point(current, mismatched)
        wait_for(lambda: model_reloads(runner, "refused") >= 1, 60, "the mismatched pair to be refused")
        assert (runner.agent.model.model_id, runner.agent.calibration.calibration_id) == old
        assert (f"keeping model {models.old.model_id} with calibration {models.old_cal.calibration_id}: "
                f"{current / 'calibration.json'}: calibration is for model {models.old.model_id}, not for this "
                f"checkpoint's model {models.new.model_id}") in caplog.text
        publish(producer, topics.frames, items[30:60], cameras=2)
        point(current, corrupt)
        wait_for(lambda: model_reloads(runner, "refused") >= 2, 60, "the corrupt checkpoint to be refused")
        assert "not a readable checkpoint (corrupt or truncated" in caplog.text
    publish(producer, topics.frames, items[60:], cameras=2)
    assert runner.join() == 0
    scores = scores_by_frame(topics)
    assert set(scores) == {item.frame_id for item in items}
    models.check_records(scores, {old})
    assert model_reloads(runner, "refused") == 2 and model_reloads(runner, "loaded") == 0
    assert calibration_refusals(runner) == 0


def test_a_model_message_on_the_control_topic_swaps_the_model(
        make_topics, producer, random_checkpoint, other_checkpoint, agent_threads, tmp_path):
    topics = make_topics(partitions=1)
    control = f"control-{topics.group}"
    ensure_topics(KafkaSection(bootstrap_servers=topics.bootstrap), {control: 1})
    items = random_items(60, "ctl", seed=14)
    models = Models(random_checkpoint, other_checkpoint, items)
    new_cal, wrong_cal = tmp_path / "new.json", tmp_path / "wrong.json"
    models.new_cal.save(new_cal)
    models.old_cal.save(wrong_cal)

    def message(checkpoint, calibration) -> bytes:
        return json.dumps({"format": "ama-stream/model", "version": 1, "checkpoint": str(checkpoint),
                           "calibration": str(calibration)}).encode()

    runner = agent_threads(topics.settings(random_checkpoint, topics={"calibration": control}, model_reload=True,
                                           calibration_check_s=0.05, max_frames=60,
                                           model_dirs=[str(p) for p in (other_checkpoint.parent, tmp_path)]))
    wait_for(lambda: runner.agent.control_topic is not None, 60, "the control topic consumer")
    old_id = models.old.model_id.encode()
    producer.send(control, key=b"another-model", value=message(other_checkpoint, new_cal))  # not ours: skipped
    producer.send(control, value=message("models/other.pt", new_cal))  # relative path: refused
    producer.send(control, key=old_id, value=message(other_checkpoint, wrong_cal))  # calibration of another model
    producer.send(control, key=old_id, value=message(other_checkpoint, new_cal))
    producer.flush()
    wait_for(lambda: runner.agent.model.model_id == models.new.model_id, 60, "the new model")
    assert model_reloads(runner, "refused", "topic") == 2 and model_reloads(runner, "loaded", "topic") == 1
    publish(producer, topics.frames, items, cameras=1)
    assert runner.join() == 0
    scores = scores_by_frame(topics)
    assert set(scores) == {item.frame_id for item in items}
    models.check_records(scores, {(models.new.model_id, models.new_cal.calibration_id)})
