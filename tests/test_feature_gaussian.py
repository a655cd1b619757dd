"""The Mahalanobis score (score: mahalanobis): the fit, the distance, the checkpoint field and its
guards, and a real small training whose Scorer, maps path and calibration all use the distance."""
import numpy as np
import pytest
import torch

from ama_stream import feature_gaussian
from ama_stream.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ama_stream.scoring import Scorer
from test_training import synthetic_data, tiny_config
from training.trainer import train


def test_distance_is_the_mahalanobis_distance_of_the_feature_difference():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((4000, 3)) * [1.0, 2.0, 0.5] + [5.0, -2.0, 0.0]
    gaussian = feature_gaussian.fit(d)
    torch.testing.assert_close(gaussian["mean"], torch.tensor([5.0, -2.0, 0.0]), atol=0.5, rtol=0)
    # features [2B, W]: (x, x) rows then (x, x_hat) rows; d = first - second
    probe = np.array([[5.0, -2.0, 0.0], [6.0, -2.0, 0.0], [5.0, 0.0, 0.0], [5.0, -2.0, 0.5]])
    features = torch.from_numpy(np.concatenate([probe + 1.0, np.ones_like(probe)])).float()
    dist = feature_gaussian.distance(features, gaussian).numpy()
    # one standard deviation along any axis is distance ~1, whatever that axis's scale (L1 would say 1, 2, 0.5;
    # Ledoit-Wolf's shrinkage pulls the axes' variances a little toward each other)
    np.testing.assert_allclose(dist, [0.0, 1.0, 1.0, 1.0], atol=0.1)
    expected = [float(np.sqrt((p - gaussian["mean"].numpy()) @ gaussian["precision"].numpy() @ (p - gaussian["mean"].numpy())))
                for p in probe]
    np.testing.assert_allclose(dist, expected, rtol=1e-5)


@pytest.mark.parametrize("bad, message", [
    ({"mean": torch.zeros(3)}, "must hold"),
    ({"mean": torch.zeros(4), "precision": torch.eye(3)}, "do not match"),
    ({"mean": torch.tensor([0.0, float("nan"), 0.0]), "precision": torch.eye(3)}, "non-finite"),
    ({"mean": torch.zeros(3), "precision": torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]])}, "not symmetric"),
    ({"mean": torch.zeros(3), "precision": -torch.eye(3)}, "not positive definite"),
    ({"mean": [0, 0, 0], "precision": torch.eye(3)}, "must hold"),
])
def test_a_crafted_gaussian_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        feature_gaussian.check(bad, 3)


@pytest.fixture(scope="module")
def mahalanobis_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("maha")
    ckpt = train(tiny_config("train.max_steps=4", "score=mahalanobis", "train.sensitivity=false"), out_dir=out,
                 data=synthetic_data())
    return ckpt, out / "model.pt"


def test_training_fits_the_gaussian_and_mu_sigma_on_separate_halves(mahalanobis_model):
    ckpt, path = mahalanobis_model
    width = ckpt.model.disc_width
    assert ckpt.feature_gaussian["mean"].shape == (width,) and ckpt.feature_gaussian["precision"].shape == (width, width)
    assert ckpt.n_train == 32  # fit_max_images 64: the Gaussian on 32, mu/sigma on the other 32
    loaded = load_checkpoint(path)
    assert loaded.score_name == "Mahalanobis" and loaded.model_id == ckpt.model_id
    torch.testing.assert_close(loaded.feature_gaussian["precision"], ckpt.feature_gaussian["precision"])
    # the Gaussian is part of what scores frames: another one is another model id
    loaded.feature_gaussian = {**loaded.feature_gaussian, "mean": loaded.feature_gaussian["mean"] + 1}
    assert save_checkpoint(loaded, path.parent / "other.pt") != ckpt.model_id


def test_every_scoring_path_gives_the_distance(mahalanobis_model):
    ckpt, path = mahalanobis_model
    scorer = Scorer(path, device="cpu")
    images = synthetic_data().test.images[::4]
    scores = scorer.score_images(images, return_features=True)
    np.testing.assert_allclose(scores.r, feature_gaussian.distance(torch.from_numpy(scores.features),
                                                                   ckpt.feature_gaussian).numpy(), rtol=1e-5)
    r_only = Scorer(path, device="cpu")
    r_only.gaussian = None
    assert not np.allclose(scores.r, r_only.score_images(images).r)  # not R
    # the path the agent takes (scores with maps from one forward) and the maps path agree with it
    np.testing.assert_allclose([i.score for i in scorer.inspect(images)], scores.r, rtol=1e-5)
    np.testing.assert_allclose(scorer.scores_and_cells(scorer.prepare(images))[0], scores.r, rtol=1e-5)
    # mu/sigma in the checkpoint are of the distance: held-out good images sit near z = 0
    good = synthetic_data(seed=5).train[:64]
    z = (scorer.r_scores(good) - ckpt.mu) / ckpt.sigma
    assert abs(float(np.median(z))) < 1.5


def test_a_checkpoint_with_a_broken_gaussian_or_on_a_patch_model_is_refused(mahalanobis_model, tmp_path):
    ckpt, path = mahalanobis_model
    payload = torch.load(path, weights_only=True)
    payload["feature_gaussian"]["precision"] = -payload["feature_gaussian"]["precision"]
    torch.save(payload, tmp_path / "neg.pt")
    with pytest.raises(CheckpointError, match="positive definite"):
        load_checkpoint(tmp_path / "neg.pt")
    with pytest.raises(ValueError, match="whole-image models"):
        tiny_config("score=mahalanobis", "data.patch={size: 32, stride: 16}")


def test_the_exported_graph_path_gives_the_distance_too(mahalanobis_model):
    """An exported graph outputs R and the pooled features; the Scorer running it returns the distance."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, path = mahalanobis_model
    images = synthetic_data().test.images[::4]
    torch_scores = Scorer(path, device="cpu").score_images(images).r
    graph_scores = Scorer(path, runtime="onnxruntime").score_images(images).r
    np.testing.assert_allclose(graph_scores, torch_scores, rtol=1e-3)


def test_calibrate_fits_mu_sigma_of_the_distance(mahalanobis_model, tmp_path, capsys):
    from PIL import Image

    from ama_stream.calibration import load_calibration
    from ama_stream.cli import main

    _, path = mahalanobis_model
    images = synthetic_data(seed=3).train[:40]
    (tmp_path / "good").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(tmp_path / "good" / f"{i:03d}.png")
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--checkpoint", str(path), "--source", f"folder:{tmp_path / 'good'}", "--out", str(out),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    scorer = Scorer(path, device="cpu")
    distances = scorer.score_images(list(images)).r
    calibration = load_calibration(out, scorer.model_id)
    assert calibration.global_entry.mu == pytest.approx(distances.mean(), rel=1e-6)
    assert calibration.global_entry.sigma == pytest.approx(distances.std(), rel=1e-6)


@pytest.mark.parametrize("override, message", [
    ("score=euclid", "score"), ("score=[r]", "score"),
    ("loss.gradient_penalty.every=0", "every"), ("loss.gradient_penalty.every=-3", "every"),
    ("loss.gradient_penalty.one_sided=maybe", "one_sided"),
])
def test_bad_score_and_penalty_settings_are_refused_with_their_key(override, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(override)


def test_a_checkpoint_whose_gaussian_is_not_a_dict_of_tensors_is_refused(mahalanobis_model, tmp_path):
    _, path = mahalanobis_model
    payload = torch.load(path, weights_only=True)
    for bad in ("mahalanobis", [1.0, 2.0], {"mean": "0", "precision": "1"}, {"mean": torch.zeros(())}):
        payload["feature_gaussian"] = bad
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match="feature_gaussian"):
            load_checkpoint(tmp_path / "bad.pt")


def test_the_report_names_the_distance_on_its_score_axis(mahalanobis_model, tmp_path, monkeypatch):
    from training import report

    _, path = mahalanobis_model
    scorer = Scorer(path, device="cpu")
    images = synthetic_data().test.images[:16]
    scores = scorer.score_images(images).r
    labels = []
    real_save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, p: labels.append(fig.axes[0].get_xlabel()) or real_save(fig, p))
    report.write_report(tmp_path, scorer, title="t", metrics={}, normal_images=images, r_normal=scores)
    assert labels[0] == "Mahalanobis distance"


def test_the_evaluate_table_names_the_distance_too():
    from training.evaluate import human_table

    metrics = {"auroc_a": 0.9, "auroc_r": 0.95, "aupr_a": 0.8, "aupr_r": 0.85, "n_normal": 10, "n_anomaly": 5,
               "holdout_n": 10, "holdout_far_checkpoint": 0.0, "holdout_r_p50": 3.0, "holdout_r_p01": 1.0,
               "holdout_r_p99": 6.0, "holdout_recon_l1": 0.1}
    table = human_table(metrics, "Mahalanobis distance").splitlines()
    assert table[0].endswith("A-score  Mahalanobis distance") and table[1].split() == ["AUROC", "0.9000", "0.9500"]
    assert "Mahalanobis distance median 3" in table[-1] and "R-score" not in "\n".join(table)
    assert human_table(metrics).splitlines()[0].endswith("A-score   R-score")  # R models keep their table
