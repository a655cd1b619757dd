"""benchmarks/quality.py end to end on the small Fashion-MNIST/MNIST fixture: one row per seed with
AMA's metrics, the hold-out set and both baselines, and --baselines-only without training AMA."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.nz=8", "model.enc_width=4", "model.gen_width=8", "model.disc_width=8", "train.batch_size=16",
        "train.epochs=1", "train.steps_per_epoch=3", "train.fit_max_images=64", "device=cpu",
        f"data_root={REPO / 'tests' / 'data'}"]


@pytest.fixture
def quality(tmp_path, monkeypatch):
    """The script as a module, writing its rows under tmp_path instead of the repository's results."""
    path = sys.path[:]
    spec = importlib.util.spec_from_file_location("quality_script", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = path
    monkeypatch.setattr(module, "RESULTS_JSONL", tmp_path / "quality.jsonl")
    monkeypatch.setattr(module, "RESULTS_MD", tmp_path / "results.md")
    return module


def run(quality, monkeypatch, tmp_path, *args) -> list[dict]:
    sets = [a for s in TINY for a in ("--set", s)]
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(REPO / "configs" / "fmnist_vs_mnist_cpu.yaml"),
                                      "--out", str(tmp_path / "runs"), *sets, *args])
    assert quality.main() == 0
    return [json.loads(line) for line in (tmp_path / "quality.jsonl").read_text().splitlines()]


def test_rows_hold_ama_holdout_and_baselines(quality, monkeypatch, tmp_path):
    rows = run(quality, monkeypatch, tmp_path, "--seeds", "0,1", "--label", "tiny", "--holdout", "idx:mnist",
               "--baseline", "pca", "--baseline", "autoencoder")
    assert [r["seed"] for r in rows] == [0, 1] and {r["variant"] for r in rows} == {"tiny"}
    for r in rows:
        assert r["steps"] == 3 and r["wall_s"] > 0 and r["n_anomaly"] > 0
        for key in ("auroc_a", "auroc_r", "far_a", "recall_upper@0.01", "far_upper@0.01"):
            assert 0.0 <= r[key] <= 1.0, key
        assert 0.0 <= r["holdout"]["auroc_r"] <= 1.0 and r["holdout"]["source"] == "idx:mnist"
        assert r["pca"]["k"] in (16, 32, 64) and 0.0 <= r["pca"]["auroc"] <= 1.0
        assert r["autoencoder"]["steps"] == 3 and 0.0 <= r["autoencoder"]["auroc"] <= 1.0
    assert (tmp_path / "runs" / "fmnist_vs_mnist_cpu-tiny-seed1" / "model.pt").is_file()
    # values, not ranges: PCA separates Fashion-MNIST from digits well, and the row's AUROC is the one
    # the saved model gives when scored again on the same test images
    assert all(r["pca"]["auroc"] > 0.85 for r in rows), [r["pca"]["auroc"] for r in rows]
    from sklearn.metrics import roc_auc_score

    from ama_stream.checkpoint import load_checkpoint
    from ama_stream.scoring import Scorer
    from training.config import TrainConfig
    from training.datasets import build_test_set

    ckpt = load_checkpoint(tmp_path / "runs" / "fmnist_vs_mnist_cpu-tiny-seed1" / "model.pt")
    cfg = TrainConfig.model_validate(ckpt.train_config)
    test = build_test_set(cfg.data, cfg.data_root, 1)
    rescored = roc_auc_score(test.labels, Scorer(ckpt, "cpu").r_scores(test.images))
    assert rescored == pytest.approx(rows[1]["auroc_r"], abs=1e-9)
    assert (tmp_path / "results.md").read_text().count("| fmnist_vs_mnist_cpu | tiny |") == 2


def test_baselines_only_trains_no_ama_model(quality, monkeypatch, tmp_path):
    [row] = run(quality, monkeypatch, tmp_path, "--baselines-only", "--label", "base", "--baseline", "pca")
    assert "auroc_a" not in row and "autoencoder" not in row and row["steps"] == 3
    assert 0.0 <= row["pca"]["auroc"] <= 1.0 and row["n_normal"] > 0 and row["n_anomaly"] > 0
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results.md").exists()


@pytest.mark.parametrize("args, message", [
    (["--baselines-only"], "needs at least one --baseline"),
    (["--baselines-only", "--baseline", "pca", "--holdout", "idx:mnist"], "does not train"),
    (["--seeds", "0,one"], "seeds must be comma-separated integers"),
])
def test_contradictory_or_malformed_arguments_stop_before_any_work(quality, monkeypatch, tmp_path, capsys,
                                                                   args, message):
    with pytest.raises(SystemExit) as exit_info:
        run(quality, monkeypatch, tmp_path, *args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "quality.jsonl").exists() and not (tmp_path / "runs").exists()
