"""The live alert page against a real broker and agent, opened in headless Chromium: alerts newest
first with frames that decode and region boxes where the records put them, heatmaps, camera rates,
drift and health; hostile ids render as text; bounded memory; a broker restart shows and clears
"reconnecting"."""
from __future__ import annotations

import io
import json
import shutil
import urllib.parse
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ama_stream.kafka_tools.broker import EmbeddedBroker, free_port
from ama_stream.kafka_tools.feed import FeedItem
from ama_stream.agent.kafka_io import ensure_topics, make_producer
from ama_stream.agent.settings import KafkaSection
from ama_stream.checkpoint import Checkpoint, save_checkpoint
from ama_stream.model import AMA, ModelConfig
from ama_stream.preprocess import PreprocessSpec
from ama_stream.view import AlertPage, Board

from .conftest import publish, read_all, wait_for

pytestmark = pytest.mark.kafka
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
HOSTILE_CAMERA = "<script>document.title='pwned'</script>"
HOSTILE_FRAME = '"><img src=x onerror="document.title=1">'


def chromium(url: str, tmp_path: Path, *extra: str) -> str:
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=6000", *extra, url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def state(page: AlertPage) -> dict:
    with urllib.request.urlopen(page.url + "state", timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def alerting_checkpoint(tmp_path_factory) -> Path:
    """An untrained patch model whose calibration makes every frame an alert (the page is the subject)."""
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, channels=1, nz=8, enc_width=4, gen_width=8, disc_width=8)
    path = tmp_path_factory.mktemp("view") / "alerting.pt"
    save_checkpoint(Checkpoint(cfg, PreprocessSpec(16, 1, patch_stride=8, scale=0.5), AMA(cfg).state_dict(),
                               mu=-1e6, sigma=1.0), path)
    return path


@needs_chromium
def test_the_page_shows_alerts_with_frames_regions_maps_and_hostile_ids_as_text(
        make_topics, producer, alerting_checkpoint, agent_threads, bootstrap, tmp_path):
    topics = make_topics(partitions=1)
    maps_topic = f"{topics.frames}-maps"
    rng = np.random.default_rng(1)
    items = [FeedItem(f"view-{i}", rng.integers(0, 255, (60, 120), dtype=np.uint8), True, f"#{i}") for i in range(4)]
    publish(producer, topics.frames, items, cameras=2)
    hostile = make_producer(KafkaSection(bootstrap_servers=bootstrap), {}, 10.0)
    from ama_stream.agent.frames import PNG, encode_frame

    hostile.send(topics.frames, key=HOSTILE_CAMERA.encode(), value=encode_frame(items[0].image, PNG),
                 headers=[("frame-id", HOSTILE_FRAME.encode()), ("camera-id", HOSTILE_CAMERA.encode())])
    hostile.close(timeout=5)
    runner = agent_threads(topics.settings(alerting_checkpoint, topics={"maps": maps_topic}, idle_exit_s=60))
    wait_for(lambda: runner.agent.stats.alerts == 5, 60, "five alerts")
    page = AlertPage(KafkaSection(bootstrap_servers=bootstrap), topics.alerts, maps_topic,
                     metrics_url=f"http://127.0.0.1:{runner.agent.metrics_port}", port=0).start()
    try:
        wait_for(lambda: len(state(page)["alerts"]) == 5 and all(a["has_map"] for a in state(page)["alerts"]),
                 60, "the page's board to hold the five alerts with their maps")
        wait_for(lambda: state(page)["health"].get("ready") is True, 30, "the agent's health")
        records = {json.loads(r.value)["frame_id"]: json.loads(r.value) for r in read_all(bootstrap, topics.alerts)}
        snapshot = state(page)
        assert [a["frame_id"] for a in snapshot["alerts"]][0] == HOSTILE_FRAME  # newest first: it was sent last
        assert snapshot["cameras"]["cam-0"]["alerts_60s"] == 2 and snapshot["cameras"][HOSTILE_CAMERA]["alerts_60s"] == 1
        dom = chromium(page.url, tmp_path, "--dump-dom")
        assert 'data-alerts="5"' in dom and 'data-images-broken="0"' in dom and 'data-connected="true"' in dom
        assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom  # shown as text
        assert "<script>document.title='pwned'" not in dom and '<img src="x"' not in dom  # no element made of them
        assert "<title>ama-stream alerts</title>" in dom  # and neither ran (each would have changed the title)
        for record in records.values():  # a box per alert, at the record's region, placed on the loaded frame
            r = record["region"]
            assert f'data-region="{r["x"]},{r["y"]},{r["w"]},{r["h"]}"' in dom
        assert dom.count("data-placed=") == 5
        shot = tmp_path / "page.png"
        chromium(page.url, tmp_path, f"--screenshot={shot}", "--window-size=1400,1800")
        with Image.open(shot) as im:
            assert im.size == (1400, 1800)
        for alert in snapshot["alerts"]:  # the frames and maps the page shows decode, at the frames' size
            with urllib.request.urlopen(page.url + "frame/" + urllib.parse.quote(alert["key"], safe=""),
                                        timeout=10) as response:
                frame = Image.open(io.BytesIO(response.read()))
                assert frame.size == (120, 60)
    finally:
        page.close()
        runner.agent.stop()


def test_the_board_keeps_the_newest_alerts_and_a_bounded_set_of_cameras():
    board = Board(max_alerts=3, max_cameras=2)
    for i in range(10):
        board.add_alert({"frame_id": f"f{i}", "camera_id": f"cam-{i % 4}", "topic": "t", "partition": 0, "offset": i},
                        now=1000.0 + i)
    board.add_map("f9", b"\x89PNG fake")
    board.add_map("f-unknown", b"not a png")
    snap = board.snapshot(now=1010.0)
    assert [a["frame_id"] for a in snap["alerts"]] == ["f9", "f8", "f7"] and snap["alerts"][0]["has_map"]
    assert len(snap["cameras"]) == 2 and board.find("t:0:9") is not None and board.find("t:0:1") is None


@needs_chromium
def test_the_page_says_reconnecting_while_the_broker_is_away_and_recovers(tmp_path):
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    kafka = KafkaSection(bootstrap_servers=broker.bootstrap)
    ensure_topics(kafka, {"alerts": 1})
    page = AlertPage(kafka, "alerts", port=0).start()
    page.tail.retry_s = 0.2
    try:
        wait_for(lambda: state(page)["connected"], 60, "the page to connect")
        broker.stop()
        wait_for(lambda: not state(page)["connected"], 60, "the page to notice the broker is gone")
        assert state(page)["status"].startswith("reconnecting")
        dom = chromium(page.url, tmp_path, "--dump-dom")
        assert 'data-connected="false"' in dom and "reconnecting" in dom
        broker = EmbeddedBroker(port=port).start()
        ensure_topics(kafka, {"alerts": 1})
        wait_for(lambda: state(page)["connected"], 90, "the page to reconnect")
    finally:
        page.close()
        broker.stop()


def test_every_metric_the_grafana_board_queries_is_in_the_agents_metrics(
        make_topics, producer, alerting_checkpoint, agent_threads):
    """docs/grafana/ama-stream.json against a real agent's /metrics after frames, alerts and a dead letter."""
    import re

    from .conftest import http_get, random_items

    board = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana" / "ama-stream.json").read_text())
    queried = {name for panel in board["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(ama_[a-z0-9_]+)", target["expr"])}
    assert len(queried) >= 10
    topics = make_topics(partitions=1)
    publish(producer, topics.frames, random_items(4, "grafana"), cameras=2)
    producer.send(topics.frames, key=b"cam-0", value=b"not an image", headers=[("frame-id", b"junk")])
    producer.flush()
    runner = agent_threads(topics.settings(alerting_checkpoint, idle_exit_s=60))
    wait_for(lambda: runner.agent.stats.scored == 4 and runner.agent.stats.dead_lettered == 1, 60, "the frames")
    status, text = http_get(runner.agent.metrics_port, "/metrics")
    runner.agent.stop()
    assert status == 200
    samples = set(re.findall(r"^(ama_[a-z0-9_]+)(?:\{| )", text, re.M))
    families = set(re.findall(r"^# TYPE (ama_[a-z0-9_]+) ", text, re.M))

    def exposed(name: str) -> bool:  # a labelled metric without samples yet is still declared
        return name in samples or any(name == f + suffix for f in families for suffix in ("", "_total", "_bucket"))

    missing = sorted(name for name in queried if not exposed(name))
    assert not missing, missing
