"""Alerts that say where: a patch model scores frames of any size over Kafka, an anomalous frame's
record carries `region` (in the frame's own pixels) and `map_max`, the optional maps topic carries a
small PNG heatmap per alert keyed by frame id, and a schema v1 reader that knows none of this still
reads every record."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ama_stream.kafka_tools.feed import FeedItem
from ama_stream.agent.records import SCORE_SCHEMA, FrameMeta, encode_record, heatmap_png, score_record
from ama_stream.checkpoint import Checkpoint, save_checkpoint
from ama_stream.model import AMA, ModelConfig
from ama_stream.preprocess import PreprocessSpec
from ama_stream.scoring import Inspection

from .conftest import publish, read_all
from .test_agent_records import _record

# what a reader written against schema v1 (before region/map_max) requires, with its types
V1_FIELDS = {"schema": str, "frame_id": str, "camera_id": (str, type(None)), "topic": str, "partition": int,
             "offset": int, "r_score": (float, type(None)), "z": (float, type(None)), "log_a": (float, type(None)),
             "p_value": (float, type(None)), "anomaly": bool, "threshold": (float, type(None)), "model_id": str,
             "calibration_id": str, "captured_at": (int, type(None)), "scored_at": int}


def v1_reader(value: bytes) -> dict:
    """A dashboard's reader of schema v1: the fields it knows, checked; anything else ignored."""
    record = json.loads(value)
    assert record["schema"] == SCORE_SCHEMA
    out = {}
    for name, kind in V1_FIELDS.items():
        assert isinstance(record[name], kind), (name, record[name])
        out[name] = record[name]
    return out


def test_region_and_map_max_are_optional_fields_a_v1_reader_ignores():
    meta = FrameMeta.from_record(_record([("frame-id", b"f-9")]))
    plain = score_record(meta, r_score=1.0, z=0.1, log_a=-1.0, p_value=0.9, anomaly=False, threshold=3.0,
                         model_id="m", calibration_id="c", scored_at=1)
    located = score_record(meta, r_score=9.0, z=5.0, log_a=-14.0, p_value=1e-6, anomaly=True, threshold=3.0,
                           model_id="m", calibration_id="c", scored_at=1,
                           inspection=Inspection(9.0, np.ones((30, 40), np.float32) * 2.5, (3, 4, 10, 6)))
    assert "region" not in plain and "map_max" not in plain
    decoded = json.loads(encode_record(located))
    assert decoded["region"] == {"x": 3, "y": 4, "w": 10, "h": 6} and decoded["map_max"] == 2.5
    assert v1_reader(encode_record(plain))["anomaly"] is False
    assert v1_reader(encode_record(located)) == {k: decoded[k] for k in V1_FIELDS}


def test_heatmap_png_is_bounded_and_keeps_the_aspect():
    png = heatmap_png(np.arange(460 * 1130, dtype=np.float32).reshape(460, 1130))
    image = Image.open(io.BytesIO(png))
    assert image.mode == "L" and image.size == (256, 104) and len(png) < 64 * 1024
    assert np.asarray(image).max() >= 250  # the maximum, averaged by the shrink
    small = Image.open(io.BytesIO(heatmap_png(np.zeros((20, 30), np.float32))))
    assert small.size == (30, 20) and np.asarray(small).max() == 0


@pytest.fixture(scope="module")
def patch_checkpoint(tmp_path_factory):
    """An untrained patch model (16x16 gray patches, stride 8, scale 0.5) whose calibration makes every
    frame an alert: the test looks at the plumbing, not at the decisions."""
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, channels=1, nz=8, enc_width=4, gen_width=8, disc_width=8)
    spec = PreprocessSpec(16, 1, patch_stride=8, scale=0.5)
    path = tmp_path_factory.mktemp("patch") / "patch.pt"
    save_checkpoint(Checkpoint(cfg, spec, AMA(cfg).state_dict(), mu=-1e6, sigma=1.0), path)
    return path


@pytest.mark.kafka
def test_alerts_carry_a_region_inside_the_frame_and_the_maps_topic_a_heatmap(
        make_topics, producer, patch_checkpoint, agent_threads, bootstrap):
    topics = make_topics(partitions=1)
    maps_topic = f"{topics.frames}-maps"
    rng = np.random.default_rng(0)
    shapes = [(28, 28), (40, 90), (9, 13), (120, 64)]
    items = [FeedItem(f"region-{i}", rng.integers(0, 255, shape, dtype=np.uint8), True, f"rand#{i}")
             for i, shape in enumerate(shapes)]
    publish(producer, topics.frames, items, cameras=2)
    runner = agent_threads(topics.settings(patch_checkpoint, max_frames=len(items), topics={"maps": maps_topic}))
    assert runner.join() == 0
    alerts = {json.loads(r.value)["frame_id"]: json.loads(r.value) for r in read_all(bootstrap, topics.alerts)}
    assert set(alerts) == {item.frame_id for item in items}
    for item in items:
        record, (h, w) = alerts[item.frame_id], item.image.shape[:2]
        box = record["region"]
        assert 0 <= box["x"] < box["x"] + box["w"] <= w and 0 <= box["y"] < box["y"] + box["h"] <= h
        assert record["map_max"] > 0
        v1_reader(json.dumps(record).encode())
    heatmaps = read_all(bootstrap, maps_topic)
    assert sorted(r.key.decode() for r in heatmaps) == sorted(alerts)
    for r in heatmaps:
        headers = dict(r.headers)
        assert headers["content-type"] == b"image/png" and headers["frame-id"] == r.key
        image = Image.open(io.BytesIO(r.value))
        h, w = next(i.image.shape[:2] for i in items if i.frame_id == r.key.decode())
        assert image.size == (w, h)  # small frames keep their size; nothing here is over 256 px
        assert float(headers["map-max"]) == pytest.approx(alerts[r.key.decode()]["map_max"], rel=1e-6)
