"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from ama_stream.sources import resolve_data_root


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets (AMA_DATA_ROOT, else ../shared/datasets); a missing copy fails loudly."""
    root = resolve_data_root()
    missing = [name for name in ("mnist", "fashion-mnist", "cifar10-jpeg", "elpv") if not (root / name).is_dir()]
    if missing:
        pytest.fail(f"real datasets missing under {root}: {', '.join(missing)} (set AMA_DATA_ROOT)")
    return root


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
