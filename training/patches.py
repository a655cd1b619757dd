"""A patch model's training inputs: random square crops of the good images at their working scale."""
from __future__ import annotations

import numpy as np


class RandomCrops:
    """Indexable like an image array: `crops[idx]` -> uint8 [len(idx), P, P, C], crop k taken from
    image k % len(images) at a random place (a seeded generator, so a run is reproducible).

    Its length is one epoch's worth: as many crops per image as patches would tile the average image,
    so an epoch sees about as many pixels as the images hold."""

    def __init__(self, images: np.ndarray, patch: int, seed: int):
        if len(images) == 0:
            raise ValueError("no training images to crop")
        small = [img.shape[:2] for img in images if img.shape[0] < patch or img.shape[1] < patch]
        if small:
            raise ValueError(f"{len(small)} images are smaller than the {patch}-pixel patch (e.g. {small[0]}); "
                             "preprocess.fit_image pads them, so fit them first")
        self.images = images
        self.patch = patch
        self.channels = images[0].shape[2]
        self.rng = np.random.default_rng([seed, 7])
        area = float(np.mean([img.shape[0] * img.shape[1] for img in images]))
        self.per_image = max(1, round(area / patch**2))

    def __len__(self) -> int:
        return len(self.images) * self.per_image

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        p = self.patch
        out = np.empty((len(idx), p, p, self.channels), np.uint8)
        for j, k in enumerate(idx):
            img = self.images[int(k) % len(self.images)]
            y = int(self.rng.integers(0, img.shape[0] - p + 1))
            x = int(self.rng.integers(0, img.shape[1] - p + 1))
            out[j] = img[y:y + p, x:x + p]
        return out
