"""configs/: every experiment YAML validates, and every CPU preset is its paper experiment scaled down."""
from __future__ import annotations

from pathlib import Path

import pytest

from ama_stream.settings import load_settings
from training.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = ["fmnist_vs_mnist", "mnist_oneclass", "cifar10_oneclass", "cifar10_vs_svhn", "elpv"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiments_keep_the_papers_hyperparameters(name):
    cfg = load_settings(TrainConfig, CONFIGS / f"{name}.yaml")
    assert cfg.train.epochs == 100 and cfg.optim.d_steps == 5 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.loss.gradient_penalty.enabled and cfg.loss.interpolation.enabled and cfg.loss.negatives.enabled
    assert cfg.model.mirrored and cfg.model.spectral_norm and cfg.model.nz == 128


@pytest.mark.parametrize("name", PAPER)
def test_each_paper_experiment_has_a_cpu_preset_on_the_same_data(name):
    paper = load_settings(TrainConfig, CONFIGS / f"{name}.yaml")
    cpu = load_settings(TrainConfig, CONFIGS / f"{name}_cpu.yaml")
    assert cpu.data == paper.data
    assert cpu.model.mirrored
    # interpolation and negatives stay on except where a measured recipe switched them off
    measured_off = {"elpv", "cifar10_oneclass"}  # docs/results.md: better without them here
    if name not in measured_off:
        assert cpu.loss.interpolation.enabled and cpu.loss.negatives.enabled
    steps = cpu.train.epochs * cpu.train.steps_per_epoch
    pixels = cpu.data.image_size ** 2 * cpu.data.channels
    # the budget that measured ~10 minutes on 2 cores: 500 steps of 64 gray 32x32 images
    assert steps * cpu.train.batch_size * pixels <= 500 * 64 * 32 * 32 * 3


def test_negative_direction_follows_the_paper():
    """Section 4.1: atypical negatives are sampled OUTWARD when Fashion-MNIST is normal, inward for CIFAR-10."""
    assert load_settings(TrainConfig, CONFIGS / "fmnist_vs_mnist.yaml").loss.negatives.direction == "outward"
    for name in ("cifar10_oneclass", "cifar10_vs_svhn"):
        assert load_settings(TrainConfig, CONFIGS / f"{name}.yaml").loss.negatives.direction == "inward"
