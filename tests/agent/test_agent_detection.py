"""A trained detector behind the agent: injected anomalies get alerted; `ama-stream demo` end to end.

The detector is the demo's small AMA, trained once per session on real Fashion-MNIST (MNIST
digits are the anomalies) for TEST_STEPS steps and cached where the demo looks for it, so the
demo test below reuses it.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from ama_stream.kafka_tools.feed import mixed_items, publish_items, truth_row
from ama_stream.calibration import load_calibration
from ama_stream.checkpoint import load_checkpoint, save_checkpoint
from ama_stream.sources import iter_images, parse_source
from training.commands.demo import demo_data, demo_model, synthetic_parts

from .conftest import REPO, read_all

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TEST_STEPS = 90


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


def _demo_args(data_root, **extra) -> argparse.Namespace:
    base = dict(synthetic=False, data_root=str(data_root), steps=TEST_STEPS, device="cpu", seed=0, retrain=False)
    return argparse.Namespace(**{**base, **extra})


@pytest.fixture(scope="session")
def trained_checkpoint(demo_cache, data_root, tmp_path_factory):
    args = _demo_args(data_root)
    ckpt = demo_model(args, demo_cache, demo_data(args, demo_cache))
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    save_checkpoint(ckpt, path)
    return path


def test_injected_anomalies_are_alerted_well_above_chance(make_topics, producer, trained_checkpoint, data_root,
                                                         agent_threads):
    topics = make_topics(partitions=2)
    normal = iter_images(parse_source("idx:fashion-mnist").with_split("test"), data_root)
    digits = iter_images(parse_source("idx:mnist").with_split("test"), data_root)
    truth: list = []
    items = mixed_items(normal, digits, 0.2, limit=600, seed=7, prefix="det")
    publish_items(producer, topics.frames, items, content_type="image/png", cameras=["a", "b", "c"],
                  on_sent=lambda item: truth.append(truth_row(item)))
    runner = agent_threads(topics.settings(trained_checkpoint, max_frames=len(truth)))
    assert runner.join() == 0

    scores = {s["frame_id"]: s for s in (json.loads(r.value) for r in read_all(topics.bootstrap, topics.scores))}
    assert set(scores) == {fid for fid, _, _ in truth}
    labels = np.array([anomaly for _, anomaly, _ in truth], dtype=bool)
    alerted = np.array([scores[fid]["anomaly"] for fid, _, _ in truth], dtype=bool)
    recall = alerted[labels].mean()
    false_alarms = alerted[~labels].mean()
    # A detector guessing at its own alert rate would have recall == false-alarm rate.
    assert recall >= 0.3 and recall >= 5 * max(false_alarms, 0.01), (recall, false_alarms)
    alert_ids = {json.loads(r.value)["frame_id"] for r in read_all(topics.bootstrap, topics.alerts)}
    assert alert_ids == {fid for (fid, _, _), a in zip(truth, alerted) if a}


def _run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ama_stream.cli", "demo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


def test_demo_on_real_data_prints_its_summary(trained_checkpoint, demo_cache, data_root):
    done = _run_demo("--cache-dir", str(demo_cache), "--data-root", str(data_root), "--steps", str(TEST_STEPS),
                     "--device", "cpu", "--frames", "400", "--rate", "150")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using the cached demo model" in done.stderr  # the session's detector, not a new training run
    out = done.stdout
    assert re.search(r"frames scored\s+400 of 400 sent \(0 dead-lettered", out), out
    recall = float(re.search(r"recall\s+([0-9.]+)", out).group(1))
    precision = float(re.search(r"precision\s+([0-9.]+)", out).group(1))
    assert recall > 0.2 and precision > 0.3, out
    assert re.search(r"latency p50 / p99\s+\d+ ms / \d+ ms", out)
    assert re.search(r"alert page\s+http://127\.0\.0\.1:\d+/", out) and "kcat -b 127.0.0.1:" in out
    assert re.search(r"training report\s+\S+/run-[0-9a-f]{12}/report\.html", out)  # beside the model it names
    # the agent ran with the demo's calibration file, fitted for this very model
    path = re.search(r"calibration\s+(\S+\.json) \(two-sided", out).group(1)
    calibration = load_calibration(path, load_checkpoint(trained_checkpoint).model_id)
    # 3000 frames, or every training image of the small fixture when the full sets are absent
    assert calibration.policy.target_fpr == 0.01 and calibration.global_entry.n in (3000, 1200)


def test_demo_without_datasets_trains_on_generated_parts(tmp_path):
    done = _run_demo("--synthetic", "--cache-dir", str(tmp_path), "--steps", "3", "--device", "cpu",
                     "--frames", "120", "--rate", "200")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "synthetic parts" in done.stdout and re.search(r"frames scored\s+120 of 120", done.stdout)
    assert "training a small AMA on synthetic parts" in done.stderr
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == [
        "calibration.npz", "normal.npz", "stream-anomaly.npz", "stream-normal.npz"]


def test_synthetic_defects_change_the_part():
    rng = np.random.default_rng(0)
    normal, defective = synthetic_parts(200, rng, False), synthetic_parts(200, rng, True)
    assert normal.shape == defective.shape == (200, 28, 28) and normal.dtype == np.uint8
    # a defect darkens part of the disc: on average defective parts are clearly darker inside
    centre = (slice(8, 20), slice(8, 20))
    assert normal[:, centre[0], centre[1]].mean() - defective[:, centre[0], centre[1]].mean() > 5
