"""`ama-stream produce` from real data sources, and the embedded broker's lifecycle."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from ama_stream.kafka_tools.broker import EmbeddedBroker
from ama_stream.agent.frames import FrameLimits, decode_frame

from .conftest import REPO, read_all

pytestmark = pytest.mark.kafka


def _produce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ama_stream.cli", "produce", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_produce_mixes_anomalies_and_writes_the_truth(make_topics, data_root, tmp_path):
    topics = make_topics(partitions=1)
    truth_file = tmp_path / "truth.csv"
    done = _produce("--bootstrap", topics.bootstrap, "--topic", topics.frames, "--source", "idx:fashion-mnist",
                    "--split", "test", "--anomaly-source", "idx:mnist", "--anomaly-fraction", "0.25", "--limit", "80",
                    "--camera-id", "line7", "--format", "npy", "--truth", str(truth_file), "--seed", "3",
                    "--data-root", str(data_root))
    assert done.returncode == 0, done.stderr
    assert "published 80 frames" in done.stderr

    with open(truth_file, newline="") as f:
        truth = {row["frame_id"]: row for row in csv.DictReader(f)}
    assert len(truth) == 80
    n_anomalies = sum(row["anomaly"] == "1" for row in truth.values())
    assert 5 <= n_anomalies <= 40  # 25% of 80 drawn with a seed
    assert all(("mnist" in row["item_id"]) for row in truth.values())

    records = read_all(topics.bootstrap, topics.frames)
    assert len(records) == 80
    for rec in records:
        headers = dict(rec.headers)
        assert rec.key == b"line7" and headers["camera-id"] == b"line7"
        assert headers["content-type"] == b"application/x-npy" and int(headers["captured-at"]) > 0
        row = truth[headers["frame-id"].decode()]
        image = decode_frame(rec.value, headers["content-type"], FrameLimits())
        assert image.shape == (28, 28) and image.dtype == np.uint8
        assert ("fashion" in row["item_id"]) == (row["anomaly"] == "0")


def test_produce_png_from_a_folder_at_a_rate(make_topics, tmp_image_tree):
    topics = make_topics(partitions=1)
    root = tmp_image_tree({"good": 6, "scratch": 4}, size=(20, 24), mode="RGB")
    done = _produce("--bootstrap", topics.bootstrap, "--topic", topics.frames, "--source", f"folder:{root}",
                    "--classes", "good", "--rate", "200")
    assert done.returncode == 0, done.stderr
    records = read_all(topics.bootstrap, topics.frames)
    assert len(records) == 6  # the class selection, to the end of the source
    assert all(decode_frame(r.value, None, FrameLimits()).shape == (20, 24, 3) for r in records)
    assert all(dict(r.headers)["content-type"] == b"image/png" for r in records)


@pytest.mark.parametrize("args, message", [
    (["--source", "idx:nowhere"], "not found"),
    (["--source", "bogus:x"], "FORMAT:ROOT"),
    (["--source", "idx:mnist", "--rate", "0"], "--rate must be positive"),
    (["--source", "idx:mnist", "--anomaly-fraction", "2"], "--anomaly-fraction"),
])
def test_produce_reports_bad_arguments_in_one_line(args, message, data_root, capsys, cli_main):
    code = cli_main(["produce", "--bootstrap", "127.0.0.1:9", "--topic", "t", "--data-root", str(data_root), *args])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and err.count("\n") == 1, err


def test_produce_says_when_the_broker_is_unreachable(data_root, capsys, cli_main):
    code = cli_main(["produce", "--bootstrap", "127.0.0.1:9", "--topic", "t", "--source", "idx:mnist", "--limit", "1",
                 "--data-root", str(data_root), "--connect-timeout-s", "1"])
    assert code == 1
    assert "cannot connect to the broker at 127.0.0.1:9" in capsys.readouterr().err.splitlines()[-1]


def test_embedded_broker_starts_and_stops_cleanly(tmp_path):
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start()
    assert broker.running and broker.bootstrap.startswith("127.0.0.1:")
    broker.stop()
    assert not broker.running
    assert "tansu" in (tmp_path / "broker.log").read_text()
