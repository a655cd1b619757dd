"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from ama_stream.sources import resolve_data_root

FIXTURE_DATA = Path(__file__).resolve().parent / "data"  # first 1200/600 images of (Fashion-)MNIST
FULL_SETS = ("mnist", "fashion-mnist", "cifar10-jpeg", "elpv")


def _full_root() -> Path | None:
    root = resolve_data_root()
    return root if all((root / name).is_dir() for name in FULL_SETS) else None


@pytest.fixture(scope="session")
def full_data_root() -> Path:
    """The full real datasets (AMA_DATA_ROOT, else ../shared/datasets); skips when they are absent."""
    root = _full_root()
    if root is None:
        pytest.skip(f"full datasets absent under {resolve_data_root()} (set AMA_DATA_ROOT to run this test)")
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Real Fashion-MNIST and MNIST: the full sets when present, else the small fixture in tests/data."""
    return _full_root() or FIXTURE_DATA


@pytest.fixture
def tmp_image_tree(tmp_path: Path) -> Callable[..., Path]:
    """make(layout, ...) writes small random images and returns the tree's root.

    layout maps folders relative to the root ("" = the root itself, "train/good", ...) to image
    counts; mode is a PIL mode ("L", "RGB", "RGBA", "I;16"), ext the file extension.
    """

    def make(layout: dict[str, int], *, name: str = "tree", size: tuple[int, int] = (12, 10),
             mode: str = "L", ext: str = ".png", seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for folder, count in layout.items():
            target = root / folder
            target.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if mode == "I;16":
                    image = Image.fromarray(rng.integers(0, 65536, size, dtype=np.uint16))
                else:
                    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
                    image = Image.fromarray(rng.integers(0, 256, (*size, *channels), dtype=np.uint8))
                image.save(target / f"{i:04d}{ext}")
        root.mkdir(parents=True, exist_ok=True)
        return root

    return make


# A tiny AMA (the Fashion-MNIST CPU preset narrowed to widths 4-8) trained for 20 steps on real images.
TINY_MODEL = ["model.nz=8", "model.enc_width=4", "model.gen_width=8", "model.disc_width=8", "train.batch_size=32",
              "train.log_every=10", "train.fit_max_images=256", "train.max_steps=20", "device=cpu"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, data_root) -> Path:
    """model.pt of a tiny AMA trained for 20 steps on 1024 Fashion-MNIST training images (test set: 64
    Fashion-MNIST test images + 16 MNIST digits); shared by the tests that only need some real model."""
    from ama_stream.preprocess import PreprocessSpec
    from ama_stream.settings import load_settings, parse_overrides
    from ama_stream.sources import load_images, parse_source
    from training.config import TrainConfig
    from training.datasets import EvalSet, ProtocolData
    from training.trainer import train

    spec = PreprocessSpec(32, 1)
    train_split = load_images(parse_source("idx:fashion-mnist").with_split("train"), data_root, spec)
    test_split = load_images(parse_source("idx:fashion-mnist").with_split("test"), data_root, spec)
    mnist = load_images(parse_source("idx:mnist").with_split("test"), data_root, spec)
    test = EvalSet(np.concatenate([test_split.images[:64], mnist.images[:16]]), np.array([0] * 64 + [1] * 16), ())
    data = ProtocolData(train_split.images[:1024], train_split.ids[:1024], EvalSet(test.images[:0], test.labels[:0], ()),
                        test)
    preset = Path(__file__).resolve().parents[1] / "configs" / "fmnist_vs_mnist_cpu.yaml"
    out = tmp_path_factory.mktemp("tiny-model")
    train(load_settings(TrainConfig, preset, parse_overrides(TINY_MODEL)), out_dir=out, data=data)
    return out / "model.pt"
