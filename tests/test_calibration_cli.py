"""`ama-stream calibrate` end to end with a (briefly) trained model on real Fashion-MNIST images."""
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from ama_stream.calibration import load_calibration
from ama_stream.cli import main
from ama_stream.preprocess import PreprocessSpec
from ama_stream.scoring import Scorer
from ama_stream.sources import load_images, parse_source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fmnist(data_root):
    spec = PreprocessSpec(32, 1)
    train_split = load_images(parse_source("idx:fashion-mnist").with_split("train"), data_root, spec)
    test_split = load_images(parse_source("idx:fashion-mnist").with_split("test"), data_root, spec)
    return train_split, test_split


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture
def cli(capsys):
    """Runs `ama-stream ...` in-process; returns (exit code, stdout, stderr)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)


def write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(folder / f"{i:04d}.png")


def test_calibrate_from_a_folder_with_one_entry_per_camera_folder(cli, checkpoint, fmnist, tmp_path):
    train_split, _ = fmnist
    write_pngs(tmp_path / "frames" / "cam-a", train_split.images[:150])
    write_pngs(tmp_path / "frames" / "cam-b", train_split.images[150:300])
    out = tmp_path / "cal.json"
    code, stdout, stderr = cli("calibrate", "--checkpoint", checkpoint, "--source", f"folder:{tmp_path / 'frames'}",
                               "--out", out, "--per-camera", "--target-fpr", "0.01", "--device", "cpu", "--batch-size", 64)
    assert code == 0, stderr
    scorer = Scorer(checkpoint, "cpu")
    calibration = load_calibration(out, scorer.model_id)
    assert set(calibration.cameras) == {"cam-a", "cam-b"}
    assert calibration.global_entry.n == 300 and calibration.cameras["cam-a"].n == 150
    # the statistics are those of the Scorer's R-scores of these very images
    r = scorer.score_images(list(train_split.images[:150])).r
    assert calibration.cameras["cam-a"].mu == pytest.approx(r.mean(), rel=1e-9)
    assert calibration.cameras["cam-a"].sigma == pytest.approx(r.std(), rel=1e-9)
    assert np.allclose(calibration.cameras["cam-a"].sample, np.sort(r))
    assert calibration.source["spec"] == f"folder:{tmp_path / 'frames'}"
    assert f"calibration {calibration.calibration_id} for model {scorer.model_id}" in stdout
    assert "global    n=300" in stdout and "camera cam-a n=150" in stdout and "expected false-alarm rate" in stdout
    assert "about 1000 are needed for a stable threshold" in stderr  # 300 frames for a 1% target


def test_camera_id_and_sigma_policy(cli, checkpoint, fmnist, tmp_path):
    train_split, _ = fmnist
    write_pngs(tmp_path / "good", train_split.images[:200])
    out = tmp_path / "cal.json"
    code, stdout, stderr = cli("calibrate", "--checkpoint", checkpoint, "--source", f"folder:{tmp_path / 'good'}",
                               "--out", out, "--per-camera", "--camera-id", "line-3", "--policy", "sigma", "--k", "2.5",
                               "--limit", "120", "--device", "cpu")
    assert code == 0, stderr
    payload = json.loads(out.read_text())
    assert payload["policy"] == {"name": "sigma", "k": 2.5}
    assert payload["source"]["limit"] == 120 and payload["source"]["camera_id"] == "line-3"
    assert payload["global"]["n"] == 120 and list(payload["cameras"]) == ["line-3"]
    assert "sigma: alert when |z| > 2.5" in stdout


@pytest.mark.slow
def test_false_alarm_rate_on_held_out_normal_data_matches_the_target(cli, checkpoint, fmnist, tmp_path, data_root):
    """Calibrate on the first half of the Fashion-MNIST test frames (never trained on); the alarm rate on
    the other half is the target and the p-values there are uniform."""
    _, test_split = fmnist
    out = tmp_path / "cal.json"
    alpha, m = 0.02, len(test_split) // 2
    code, _, stderr = cli("calibrate", "--checkpoint", checkpoint, "--source", "idx:fashion-mnist", "--split", "test",
                          "--limit", m, "--target-fpr", alpha, "--out", out, "--device", "cpu", "--data-root", data_root)
    assert code == 0, stderr
    scorer = Scorer(checkpoint, "cpu")
    calibration = load_calibration(out, scorer.model_id)
    assert calibration.global_entry.n == m
    r = scorer.r_scores(scorer.prepare(list(test_split.images[m:])))
    d = calibration.decide(r)
    n_test = len(r)
    tolerance = 4.5 * math.sqrt(alpha * (1 - alpha) * (1 / (m + 1) + 1 / n_test))
    assert abs(d.anomaly.mean() - alpha) < tolerance, d.anomaly.mean()
    # p-values are uniform given an exchangeable calibration sample; with a small sample (the fixture's
    # 300 frames) its own spread dominates, so compare the two halves' scores rather than p to U(0, 1)
    r_cal = scorer.r_scores(scorer.prepare(list(test_split.images[:m])))
    assert stats.ks_2samp(r_cal, r).pvalue > 0.001
    if m >= 2000:
        assert stats.kstest(d.p_value, "uniform").pvalue > 0.001


@pytest.mark.parametrize("args,message", [
    (["--policy", "sigma", "--target-fpr", "0.01"], "--target-fpr applies to the two-sided and upper policies"),
    (["--k", "3"], "--k applies to the sigma policy"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--target-fpr", "1.5"], r"target_fpr in \(0, 1\)"),
    (["--bootstrap", "localhost:9092"], "--bootstrap and --config apply to kafka: sources and --publish only"),
])
def test_bad_options_fail_with_one_line(cli, checkpoint, tmp_path, args, message):
    code, stdout, stderr = cli("calibrate", "--checkpoint", checkpoint, "--source", "idx:fashion-mnist",
                               "--out", tmp_path / "c.json", *args)
    assert code == 1 and stdout == ""
    lines = [line for line in stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("ama-stream calibrate: error:")
    assert re.search(message, lines[0])
    assert not (tmp_path / "c.json").exists()


def test_bad_source_or_checkpoint_fail_with_one_line(cli, checkpoint, tmp_path):
    code, _, stderr = cli("calibrate", "--checkpoint", checkpoint, "--source", f"folder:{tmp_path / 'missing'}",
                          "--out", tmp_path / "c.json")
    assert code == 1 and "folder source root not found" in stderr
    code, _, stderr = cli("calibrate", "--checkpoint", tmp_path / "none.pt", "--source", "idx:mnist",
                          "--out", tmp_path / "c.json")
    assert code == 1 and "no such checkpoint file" in stderr
    with pytest.raises(SystemExit) as usage:
        cli("calibrate", "--checkpoint", checkpoint, "--source", "idx:mnist")
    assert usage.value.code == 2


def test_calibrate_defaults_to_the_policy_the_model_was_trained_for(cli, checkpoint, tmp_path, data_root):
    """The Fashion-MNIST preset says `policy: upper` (its anomalies score high); --policy overrides it."""
    from ama_stream.checkpoint import load_checkpoint

    assert load_checkpoint(checkpoint).train_config["policy"] == "upper"
    out = tmp_path / "cal.json"
    code, _, stderr = cli("calibrate", "--checkpoint", checkpoint, "--source", "idx:fashion-mnist", "--split", "test",
                          "--limit", 200, "--out", out, "--device", "cpu", "--data-root", data_root)
    assert code == 0, stderr
    assert json.loads(out.read_text())["policy"]["name"] == "upper"
    code, _, stderr = cli("calibrate", "--checkpoint", checkpoint, "--source", "idx:fashion-mnist", "--split", "test",
                          "--limit", 200, "--policy", "two-sided", "--out", out, "--device", "cpu",
                          "--data-root", data_root)
    assert code == 0 and json.loads(out.read_text())["policy"]["name"] == "two-sided"
