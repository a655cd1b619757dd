"""The own-line journey on real image files: train on good images only, the report, evaluate
against defects, calibrate from the held-out slice, size/channel defaults, warnings, --skip-corrupt."""
from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.epochs=2", "--set", "train.steps_per_epoch=3", "--set", "train.batch_size=16",
        "--set", "model.nz=8", "--set", "model.enc_width=4", "--set", "model.gen_width=8", "--set", "model.disc_width=8",
        "--set", "train.log_every=1", "--device", "cpu"]
REPORT_PNGS = {"scores.png", "losses.png", "reconstructions.png", "sensitivity.png", "maps.png"}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ama_stream.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"ama-stream {args[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def camera_folder(root: Path, n: int, defect: bool, seed: int) -> Path:
    """80x60 colour JPEGs of a bright part on a dark belt; defects carry a dark scratch."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:60, :80]
    for i in range(n):
        cx, cy = 40 + rng.normal(0, 2), 30 + rng.normal(0, 2)
        img = 60 + 140 * (((xx - cx) ** 2 + (yy - cy) ** 2) < 400) + rng.normal(0, 8, (60, 80))
        if defect:
            x0 = int(rng.integers(25, 50))
            img[20:40, x0:x0 + 3] = 20
        rgb = np.stack([img, img * 0.9, img * 0.8], -1)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("line3")
    good = camera_folder(base / "good", 160, defect=False, seed=0)
    bad = camera_folder(base / "defects", 24, defect=True, seed=1)
    run = base / "run"
    proc = cli("train", "--normal", f"folder:{good}", "--out", run, *TINY)
    assert "model input from the data: 32x32, colour" in proc.stderr  # the patch size and channels are logged
    assert "per-position statistics on: images worked on at 80x60" in proc.stderr  # one camera set-up
    # a model 6 steps old: the label-free check says loudly, among the last lines, that it catches nothing
    assert "WARNING: at the alert threshold this model catches no synthetic defect of 32 px" in \
        "\n".join(proc.stderr.strip().splitlines()[-3:])
    return {"good": good, "bad": bad, "run": run}


def test_good_only_training_writes_model_metrics_and_report(line):
    run = line["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "auroc_a" not in metrics  # no anomalies, no AUROC
    assert 0 < metrics["holdout_n"] < 40 and metrics["holdout_normal_count"] == metrics["holdout_n"]
    assert 0 <= metrics["holdout_far_checkpoint"] <= 1 and metrics["holdout_r_std"] > 0
    assert metrics["holdout_recon_l1"] > 0
    for name in ("model.pt", "metrics.json", "metrics.csv", "report.html", *REPORT_PNGS):
        assert (run / name).is_file(), name
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,elapsed_s,") and len(rows) == 1 + 6  # one row per logged step


def test_metrics_and_report_say_what_the_model_will_catch(line):
    sens = json.loads((line["run"] / "metrics.json").read_text())["sensitivity"]
    assert sens["sizes_px"] == [2, 4, 8, 16, 32] and sens["n_good"] > 0 and sens["warning"].startswith("WARNING")
    assert set(sens["rates"]) == {"spot", "scratch", "cutpaste", "blend"}
    assert sens["seen_in_training"] == []  # the template trains on good crops only: no probe kind was seen
    page = (line["run"] / "report.html").read_text()
    summary = page[page.index('<section id="summary">'):page.index("</section>")]
    assert summary.index("WARNING: at the alert threshold") < summary.index("Trained on")  # the loud line first
    assert '<table id="sensitivity">' in summary and "sensitivity.png" in page


def test_report_references_every_plot_and_the_plots_decode(line):
    page = (line["run"] / "report.html").read_text()
    referenced = set(re.findall(r'<img src="([^"]+)"', page))
    assert REPORT_PNGS <= referenced
    for name in referenced:
        with Image.open(line["run"] / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 100
    assert "holdout_far_checkpoint" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium_with_every_image_loaded(line, tmp_path):
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           (line["run"] / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-images-broken="0"' in proc.stdout, proc.stdout[:500]


def test_output_files_are_readable_by_other_users(line):
    for name in ("model.pt", "metrics.json", "report.html", "scores.png"):
        mode = stat.S_IMODE((line["run"] / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))  # 0666 less the usual umask 022, not mkstemp's 0600


def test_model_size_and_channels_come_from_the_images(line):
    from ama_stream.checkpoint import load_checkpoint

    ckpt = load_checkpoint(line["run"] / "model.pt")
    spec = ckpt.preprocess
    assert (spec.image_size, spec.channels) == (32, 3)  # the template's 32x32 patches; channels auto: colour JPEGs
    assert spec.patched and spec.scale == 1.0  # scale auto: 60 px short side is under 128, never enlarged
    assert spec.frame_size == (60, 80) and ckpt.position_stats["map_mean"].shape == (60, 80)  # one camera set-up


def test_evaluate_scores_the_held_out_slice_against_defects(line, tmp_path):
    proc = cli("evaluate", "--checkpoint", line["run"] / "model.pt", "--anomaly", f"folder:{line['bad']}",
               "--plots", tmp_path / "eval", "--maps", tmp_path / "maps", "--sensitivity", "--device", "cpu")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    trained = json.loads((line["run"] / "metrics.json").read_text())
    assert (result["n_normal"], result["n_anomaly"]) == (trained["holdout_n"], 24)  # the same slice, every defect
    # dark bars on a bright part: even this tiny model, 6 steps old, ranks them well above chance (0.78 here)
    assert result["auroc_r"] > 0.7 and "recall_upper@0.01" in result
    assert "AUROC" in proc.stderr and "recall at 0.01 false-alarm rate" in proc.stderr  # the human table
    assert "do not match the model's" not in proc.stderr  # every image has the training images' size
    assert "held-out normal images are not those recorded" not in proc.stderr
    assert result["sensitivity"]["n_good"] == result["n_normal"] and "what the checkpoint's threshold catches" in proc.stderr
    for name in ("report.html", "roc.png", "pr.png", "scores.png", "reconstructions.png", "maps.png", "sensitivity.png"):
        assert (tmp_path / "eval" / name).is_file()
    maps = sorted(str(p.relative_to(tmp_path / "maps")) for p in (tmp_path / "maps").rglob("*.png"))
    assert len(maps) == result["n_normal"] + 24 and all(Image.open(tmp_path / "maps" / m).size == (80, 60) for m in maps)
    assert {f"defects/{i:04d}.png" for i in range(24)} <= set(maps)  # named by folder and file stem
    assert len([m for m in maps if m.startswith("good/")]) == result["n_normal"]


def test_evaluate_without_defects_reports_the_held_out_slice(line):
    result = json.loads(cli("evaluate", "--checkpoint", line["run"] / "model.pt", "--device", "cpu").stdout)
    assert "auroc_a" not in result and result["holdout_n"] > 0


def test_calibrate_from_the_held_out_slice_and_warns_about_resized_frames(line, tmp_path):
    out = tmp_path / "cal.json"
    proc = cli("calibrate", "--checkpoint", line["run"] / "model.pt", "--source", "heldout", "--policy", "upper",
               "--target-fpr", "0.1", "--out", out, "--device", "cpu")
    trained = json.loads((line["run"] / "metrics.json").read_text())
    assert json.loads(out.read_text())["global"]["n"] == trained["holdout_n"]
    assert "do not match the model" not in proc.stderr
    assert "what this threshold catches" in proc.stdout and "spot" in proc.stdout  # what tightening costs
    other = tmp_path / "other-camera"  # another camera's frame size: brought to the model's working size, said so
    for i in range(12):
        Image.fromarray(np.full((75, 100, 3), 120 + i, np.uint8)).save(other / f"{i}.png") if other.mkdir(
            exist_ok=True) is None else None
    proc = cli("calibrate", "--checkpoint", line["run"] / "model.pt", "--source", f"folder:{other}",
               "--out", tmp_path / "cal2.json", "--device", "cpu")
    assert re.search(r"WARNING .*12 of 12 frames do not match the model's patches of 32x32x3 at scale 1: 12 resized",
                     proc.stderr)


def test_a_corrupt_file_stops_training_by_name_unless_skipped(tmp_path):
    good = camera_folder(tmp_path / "good", 60, defect=False, seed=2)
    (good / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    proc = cli("train", "--normal", f"folder:{good}", "--out", tmp_path / "a", *TINY, check=False)
    assert proc.returncode != 0 and "broken.jpg" in proc.stderr.strip().splitlines()[-1]
    proc = cli("train", "--normal", f"folder:{good}", "--skip-corrupt", "--out", tmp_path / "b", *TINY)
    assert "skipped 1 undecodable images" in proc.stderr and "broken.jpg" in proc.stderr
    assert (tmp_path / "b" / "model.pt").is_file()


def test_a_tree_of_classes_needs_to_be_told_which_are_good(tmp_path):
    camera_folder(tmp_path / "line" / "good", 40, defect=False, seed=3)
    camera_folder(tmp_path / "line" / "scratch", 4, defect=True, seed=4)
    proc = cli("train", "--normal", f"folder:{tmp_path / 'line'}", "--out", tmp_path / "x", *TINY, check=False)
    assert proc.returncode != 0 and "say which are good" in proc.stderr
    cli("train", "--normal", f"folder:{tmp_path / 'line'}", "--normal-classes", "good", "--out", tmp_path / "y", *TINY)
    assert "auroc_a" in json.loads((tmp_path / "y" / "metrics.json").read_text())  # scratch became the anomalies


def test_tensorboard_events_when_tensorboard_is_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (optional)")
    good = camera_folder(tmp_path / "good", 40, defect=False, seed=5)
    cli("train", "--normal", f"folder:{good}", "--out", tmp_path / "run", *TINY)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
