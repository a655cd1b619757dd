"""Real training on small budgets: reproducibility, resume, the schedule, and train/evaluate through the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ama_stream.checkpoint import load_checkpoint
from ama_stream.settings import load_settings, parse_overrides
from training import trainer as trainer_module
from training.config import TrainConfig
from training.datasets import EvalSet, ProtocolData
from training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
CPU_PRESET = REPO / "configs" / "fmnist_vs_mnist_cpu.yaml"
TINY = [
    "model.nz=8", "model.enc_width=4", "model.gen_width=8", "model.disc_width=8",
    "train.batch_size=16", "train.log_every=1", "train.fit_max_images=64", "device=cpu",
    # the full objective, whatever the preset switches off
    "loss.interpolation.enabled=true", "loss.negatives.enabled=true",
]


def tiny_config(*extra: str) -> TrainConfig:
    return load_settings(TrainConfig, CPU_PRESET, parse_overrides(TINY + list(extra)))


def synthetic_data(n=96, seed=0) -> ProtocolData:
    rng = np.random.default_rng(seed)
    normal = rng.integers(0, 60, (n, 32, 32, 1), dtype=np.uint8)
    anomaly = rng.integers(150, 255, (16, 32, 32, 1), dtype=np.uint8)
    test = EvalSet(np.concatenate([normal[:32], anomaly]), np.array([0] * 32 + [1] * 16), ())
    empty = EvalSet(normal[:0], np.zeros(0, np.int64), ())
    return ProtocolData(normal, (), empty, test)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ama_stream.cli", *args], capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"ama-stream {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def weights(ckpt) -> dict:
    return {k: v.clone() for k, v in ckpt.state_dict.items()}


def test_same_seed_same_model_different_seed_different_model():
    cfg = tiny_config("train.max_steps=3", "loss.negatives.start_epoch=0")
    a = weights(train(cfg, data=synthetic_data()))
    b = weights(train(cfg, data=synthetic_data()))
    c = weights(train(tiny_config("train.max_steps=3", "loss.negatives.start_epoch=0", "seed=1"), data=synthetic_data()))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("average", [["train.ema_decay=null"], ["train.ema_decay=0.9"]], ids=["last-weights", "weight-average"])
def test_resume_continues_exactly_where_it_stopped(tmp_path, average):
    # 2 epochs of 3 steps, with the negatives switching on in the second epoch and an lr milestone.
    common = ["train.steps_per_epoch=3", "loss.negatives.start_epoch=1", "optim.milestones=[1]", *average]
    straight = train(tiny_config(*common, "train.epochs=2"), out_dir=tmp_path / "straight", data=synthetic_data())
    train(tiny_config(*common, "train.epochs=1"), out_dir=tmp_path / "part", data=synthetic_data())
    resumed = train(tiny_config(*common, "train.epochs=2"), out_dir=tmp_path / "resumed",
                    resume=tmp_path / "part" / "train_state.pt", data=synthetic_data())
    assert resumed.metrics["steps"] == straight.metrics["steps"] == 6
    for k, v in straight.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[k], v, rtol=0, atol=0)


def test_resume_refuses_a_different_model_and_garbage(tmp_path):
    train(tiny_config("train.max_steps=1"), out_dir=tmp_path / "a", data=synthetic_data())
    other = Trainer(tiny_config("model.nz=12"), synthetic_data())
    with pytest.raises(ValueError, match="differs from the configuration"):
        other.load_train_state(tmp_path / "a" / "train_state.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable training state"):
        other.load_train_state(tmp_path / "junk.pt")


def test_negatives_start_at_their_epoch_and_lr_follows_milestones(monkeypatch):
    calls = []
    real = trainer_module.sample_negatives

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "sample_negatives", spy)
    cfg = tiny_config("train.epochs=3", "train.steps_per_epoch=2", "loss.negatives.start_epoch=2", "optim.milestones=[1, 2]")
    t = Trainer(cfg, synthetic_data())
    t.fit()
    assert len(calls) == 2  # only the third epoch's two steps
    for opt in t.optimizers.values():
        assert opt.param_groups[0]["lr"] == pytest.approx(3e-4 * 0.01)


def test_model_selection_with_labelled_validation_anomalies():
    data = synthetic_data()
    val = EvalSet(data.test.images, data.test.labels, ())
    cfg = tiny_config("train.epochs=2", "train.steps_per_epoch=2", "train.select_from_epoch=0")
    t = Trainer(cfg, ProtocolData(data.train, (), val, data.test))
    ckpt = t.fit()
    assert t.state.best_epoch in (0, 1)
    assert ckpt.metrics["selected_epoch"] == t.state.best_epoch + 1


def test_training_learns_the_separable_set():
    """A test that can fail: after a short training the product's default score (two-sided, A) must rank
    bright anomalies apart from dark normal images (chance is 0.5). R alone ranks this set inverted
    (the bright images' critic-feature gap is the smaller one), which is why A is two-sided."""
    ckpt = train(tiny_config("train.max_steps=30", "seed=1"), data=synthetic_data())
    assert ckpt.metrics["steps"] == 30
    assert ckpt.metrics["auroc_a"] >= 0.9, ckpt.metrics["auroc_a"]
    assert np.isfinite(ckpt.metrics["holdout_recon_l1"])


def test_too_few_images_for_the_batch():
    with pytest.raises(ValueError, match="batch size"):
        Trainer(tiny_config("train.batch_size=200"), synthetic_data())


@pytest.mark.slow
def test_train_and_evaluate_through_the_cli_on_fashion_mnist(tmp_path, data_root):
    out = tmp_path / "run"
    sets = [f"--set={s}" for s in TINY + ["data.limit_train=2000", "data.limit_test=600"]]
    proc = run_cli("train", "--config", str(CPU_PRESET), "--out", str(out), "--max-steps", "6",
                   "--data-root", str(data_root), "--seed", "3", *sets)
    assert "model.pt" in proc.stdout
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.train_config["seed"] == 3 and ckpt.metrics["steps"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["auroc_a"] <= 1.0 and metrics["model_id"] == ckpt.model_id
    assert (out / "train_state.pt").is_file()

    proc = run_cli("evaluate", "--checkpoint", str(out / "model.pt"), "--data-root", str(data_root))
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON line on stdout; logs go to stderr
    result = json.loads(lines[0])
    for key in ("auroc_a", "auroc_r", "aupr_a", "aupr_r", "f1_a"):
        assert 0.0 <= result[key] <= 1.0
    assert result["n_normal"] + result["n_anomaly"] == 600
    assert result["n_anomaly"] == 100  # 20% of the normal count, kept by limit_test
    assert result["auroc_r"] == pytest.approx(metrics["auroc_r"])  # same protocol, same seed, same scores

    # Replace the anomaly side: Fashion-MNIST vs a folder of bright noise images.
    noise = tmp_path / "noise"
    noise.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(noise / f"{i}.png")
    proc = run_cli("evaluate", "--checkpoint", str(out / "model.pt"), "--data-root", str(data_root),
                   "--anomaly", f"folder:{noise}", "--set", "data.limit_test=null")
    result = json.loads(proc.stdout)
    # all 40 (fewer than 20% of the normal test images), none dropped by a test-size cap
    assert result["anomaly"]["root"] == str(noise)
    n_test = 10000 if (data_root / "cifar10-jpeg").is_dir() else 600  # the full set, or the small fixture
    assert (result["n_normal"], result["n_anomaly"]) == (n_test, 40)


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("train", "--config", str(CPU_PRESET), "--bogus", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--bogus" in proc.stderr
    proc = run_cli("train", "--config", str(CPU_PRESET), "--set", "model.depth=3", check=False)
    assert proc.returncode == 1 and "model.depth: unknown key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("train", "--config", str(tmp_path / "none.yaml"), check=False)
    assert proc.returncode == 1 and "config file not found" in proc.stderr
    proc = run_cli("evaluate", "--checkpoint", str(tmp_path / "none.pt"), check=False)
    assert proc.returncode == 1 and "no such checkpoint" in proc.stderr
    proc = run_cli("train", "--config", str(CPU_PRESET), "--epochs", "zero", check=False)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr


def test_model_selection_ranks_epochs_by_the_a_score_under_the_fitted_gaussian(monkeypatch):
    """Defect 3: selection built its scorer with mu=0, sigma=1, so "AUROC-A" was AUROC-R. Epoch 1's
    anomalies score unusually low AND high (A finds them, R does not); epoch 2's only a little high
    (R ranks them better than A). The A-score must pick epoch 1."""
    data = synthetic_data()
    labels = np.array([0] * 40 + [1] * 20)
    val = EvalSet(np.zeros((60, 32, 32, 1), np.uint8), labels, ())
    rng = np.random.default_rng(0)
    normal_val = 10 + rng.standard_normal(40)
    scenarios = {
        0: np.concatenate([normal_val, np.full(10, 4.0), np.full(10, 16.0)]),  # AUROC A ~1.0, R ~0.5
        1: np.concatenate([normal_val, np.full(20, 11.3)]),  # AUROC R ~0.9, A lower
    }
    epoch = {"now": 0}

    def fake_r_scores(scorer, images, batch_size=256, desc=None):
        if len(images) == len(val.images):
            return scenarios[epoch["now"]]
        return 10 + rng.standard_normal(len(images))  # the fit subset: N(10, 1)

    monkeypatch.setattr(trainer_module.Scorer, "r_scores", fake_r_scores)
    t = Trainer(tiny_config("train.select_from_epoch=0"), ProtocolData(data.train, (), val, data.test))
    for e in (0, 1):
        epoch["now"] = e
        t._select_model(e)
    assert t.state.best_epoch == 0


def test_weight_average_is_what_the_checkpoint_holds():
    """train.ema_decay: the saved networks are the running average of the step weights (decay 0.5 over
    three steps: w = 0.25 w1 + 0.25 w2 + 0.5 w3), not the last step's weights; BN statistics are
    recomputed for them."""
    steps = []
    original = Trainer.train_step

    def spy(self, x, epoch, images=None):
        logs = original(self, x, epoch, images)
        steps.append({k: v.detach().clone() for k, v in self.model.named_parameters()})
        return logs

    cfg = tiny_config("train.max_steps=3", "train.ema_decay=0.5")
    trainer = Trainer(cfg, synthetic_data())
    trainer.train_step = spy.__get__(trainer)
    ckpt = trainer.fit()
    name = "generator.dense.weight"
    expected = 0.25 * steps[0][name] + 0.25 * steps[1][name] + 0.5 * steps[2][name]
    assert torch.allclose(ckpt.state_dict[name], expected, atol=1e-6)
    assert not torch.allclose(ckpt.state_dict[name], steps[2][name])
    bn_mean = ckpt.state_dict["encoder.net.1.running_mean"]
    assert torch.isfinite(bn_mean).all() and bn_mean.abs().sum() > 0
    assert ckpt.state_dict["encoder.net.1.num_batches_tracked"] > 0
    assert np.isfinite(ckpt.mu) and ckpt.sigma > 0


def test_the_guard_stops_a_run_whose_loss_is_not_finite_and_keeps_the_last_good_step(monkeypatch):
    """A step with a NaN loss stops training with one line naming the step and the remedy; the
    checkpoint holds the weights of the last good step (log_every 1: the step before), not the bad ones."""
    original, seen = Trainer.train_step, []

    def step(self, x, epoch, images=None):
        logs = original(self, x, epoch, images)
        seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return {**logs, "loss_d": float("nan")} if len(seen) == 3 else logs

    monkeypatch.setattr(Trainer, "train_step", step)
    ckpt = train(tiny_config("train.max_steps=6", "train.ema_decay=null", "train.sensitivity=false"),
                 data=synthetic_data())
    assert ckpt.metrics["stopped"]["restored_step"] == 2 and len(seen) == 3
    assert "training stopped at step 3: loss_d not finite" in ckpt.metrics["stopped"]["reason"]
    assert "spectral_norm" in ckpt.metrics["stopped"]["reason"]
    name = "generator.dense.weight"
    assert torch.equal(ckpt.state_dict[name], seen[1][name])  # step 2's weights
    assert not torch.equal(ckpt.state_dict[name], seen[2][name])


def test_the_guard_stops_a_runaway_critic_through_the_cli(tmp_path, data_root):
    """train.max_critic: a critic value past the bound ends `train` with exit status 1, the step and
    the remedy on its last line, and the model of the last good step on disk (here: before step 1)."""
    out = tmp_path / "run"
    sets = [f"--set={s}" for s in TINY + ["data.limit_train=500", "data.limit_test=200", "train.max_critic=1e-9",
                                          "train.sensitivity=false"]]
    proc = run_cli("train", "--config", str(CPU_PRESET), "--out", str(out), "--max-steps", "6",
                   "--data-root", str(data_root), *sets, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "training stopped at step 1" in last and "past train.max_critic" in last and "spectral_norm" in last
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.metrics["stopped"]["restored_step"] == 0
