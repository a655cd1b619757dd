"""A patch model trained for real on a small budget: random crops of images of their own size,
synthetic-defect negatives, per-position statistics fitted on the finished model, and a spot on the
part ranked above good parts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ama_stream.scoring import Scorer
from ama_stream.settings import load_settings, parse_overrides
from training.config import NegativesSection, TrainConfig
from training.datasets import EvalSet, ProtocolData
from training.negatives import synthetic_negatives
from training.patches import RandomCrops
from training.trainer import train

from test_training import REPO

OWN = REPO / "configs" / "own_data.yaml"


def part(rng: np.random.Generator, spot: bool = False) -> np.ndarray:
    """A 48x96 gray photo of an aligned part: bright stripes at fixed places, sensor noise; a spot is a
    bright 6x6 blemish somewhere on it."""
    yy, xx = np.mgrid[:48, :96]
    img = 110 + 60 * np.sin(xx / 7.0) * (yy > 10) + rng.normal(0, 4, (48, 96))
    if spot:
        y, x = rng.integers(12, 40), rng.integers(8, 88)
        img[y:y + 6, x:x + 6] += 120
    return np.clip(img, 0, 255).astype(np.uint8)[:, :, None]


def as_objects(images) -> np.ndarray:
    out = np.empty(len(images), dtype=object)
    for i, img in enumerate(images):
        out[i] = img
    return out


def test_synthetic_negatives_are_defective_copies_of_the_batch():
    rng = np.random.default_rng(0)
    batch = np.stack([part(rng)[:32, :32] for _ in range(8)])
    cfg = NegativesSection(mode="synthetic", kinds=["spot", "scratch"], size=(3.0, 8.0), contrast=(0.3, 0.5))
    negatives = synthetic_negatives(cfg, batch, 5, np.random.default_rng(1))
    assert negatives.shape == (5, 32, 32, 1) and negatives.dtype == np.uint8
    for neg in negatives:
        changed = min(int((neg != img).sum()) for img in batch)  # the copy it came from differs a little
        assert 0 < changed < neg.size // 4


def test_random_crops_are_seeded_inside_the_images_and_refuse_small_ones():
    images = as_objects([part(np.random.default_rng(i)) for i in range(3)])
    a, b = RandomCrops(images, 16, seed=3), RandomCrops(images, 16, seed=3)
    assert len(a) == 3 * round(48 * 96 / 256)
    crops = a[np.arange(10)]
    assert crops.shape == (10, 16, 16, 1) and np.array_equal(crops, b[np.arange(10)])
    with pytest.raises(ValueError, match="smaller than the 16-pixel patch"):
        RandomCrops(as_objects([np.zeros((8, 40, 1), np.uint8)]), 16, seed=0)


@pytest.mark.slow
def test_patch_model_with_synthetic_negatives_trains_and_ranks_spots_above_good_parts():
    rng = np.random.default_rng(0)
    train_images = as_objects([part(rng) for _ in range(96)])
    test_images = as_objects([part(rng) for _ in range(12)] + [part(rng, spot=True) for _ in range(12)])
    shapes = np.array([(48, 96, 1)] * 24)
    test = EvalSet(test_images, np.array([0] * 12 + [1] * 12), tuple(f"t/{i}.png" for i in range(24)), shapes)
    empty = EvalSet(test_images[:0], np.zeros(0, np.int64), ())
    cfg = load_settings(TrainConfig, OWN, parse_overrides([
        "data.normal={format: folder, root: unused}", "data.scale=1.0", "data.channels=1", "data.patch.size=16",
        "data.patch.stride=8", "data.frame_size=[48, 96]", "model.nz=8", "model.enc_width=8", "model.gen_width=8",
        "model.disc_width=8", "train.batch_size=16", "train.epochs=2", "train.steps_per_epoch=15",
        "train.fit_max_images=96", "loss.negatives.enabled=true", "loss.negatives.mode=synthetic",
        "loss.negatives.start_epoch=0", "device=cpu"]))
    ckpt = train(cfg, data=ProtocolData(train_images, (), empty, test))
    assert ckpt.metrics["steps"] == 30 and ckpt.position_stats is not None
    assert ckpt.preprocess.frame_size == (48, 96) and ckpt.preprocess.patch_stride == 8
    # a 6x6 bright spot on a part the model saw only good: ranked above the good parts
    print("patch model AUROC", ckpt.metrics["auroc_r"])
    assert ckpt.metrics["auroc_r"] >= 0.9, ckpt.metrics["auroc_r"]
    maps = Scorer(ckpt, "cpu").anomaly_maps([test_images[12]])
    assert maps[0].shape == (48, 96) and np.isfinite(maps[0]).all()
