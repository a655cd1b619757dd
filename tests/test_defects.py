"""Synthetic defects: every kind changes pixels only inside its mask, the mask lies inside the image
and grows with the size, results are reproducible per seed, and bad arguments are refused."""
from __future__ import annotations

import numpy as np
import pytest

from ama_stream.defects import KINDS, implant, implant_batch, perlin_noise


def _image(h: int = 48, w: int = 80, c: int = 3, seed: int = 0) -> np.ndarray:
    base = np.random.default_rng(seed).integers(90, 160, (h, w, c), dtype=np.uint8)
    return base


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_pixels_only_inside_its_mask(kind):
    image = _image()
    out, mask = implant(image, kind, 12, 0.5, np.random.default_rng(1), donor=_image(seed=9))
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == image.shape[:2]
    assert mask.any()
    assert np.array_equal(out[~mask], image[~mask])  # outside the mask nothing moved
    assert not np.array_equal(out, image)
    assert (image == _image()).all()  # the input is not modified


@pytest.mark.parametrize("kind", KINDS)
def test_masks_grow_with_size_and_stay_inside_even_at_the_image_size(kind):
    areas = []
    for size in (2, 6, 16, 40):
        _, mask = implant(_image(40, 40), kind, size, 0.6, np.random.default_rng(size), donor=_image(40, 40, seed=5))
        areas.append(int(mask.sum()))
    assert areas[-1] > areas[0] and all(a > 0 for a in areas)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_results_repeat_and_differ_across_seeds(kind):
    donor = _image(seed=4)
    a = implant(_image(), kind, 10, 0.4, np.random.default_rng(7), donor)
    b = implant(_image(), kind, 10, 0.4, np.random.default_rng(7), donor)
    c = implant(_image(), kind, 10, 0.4, np.random.default_rng(8), donor)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1]) or not np.array_equal(a[0], c[0])


def test_gray_images_and_a_tiny_image():
    out, mask = implant(_image(6, 5, 1), "spot", 30, 1.0, np.random.default_rng(0))
    assert out.shape == (6, 5, 1) and mask.any()


def test_batch_implants_one_defect_per_image():
    images = np.stack([_image(32, 32, seed=s) for s in range(6)])
    out, masks = implant_batch(images, ("spot", "cutpaste"), (2.0, 8.0), (0.2, 0.5), np.random.default_rng(0))
    assert out.shape == images.shape and masks.shape == images.shape[:3]
    assert all(masks[i].any() for i in range(6))


def test_perlin_noise_is_smooth_and_bounded():
    noise = perlin_noise(64, 96, (4, 6), np.random.default_rng(0))
    assert noise.shape == (64, 96) and np.abs(noise).max() <= 1.5 and noise.std() > 0.05
    assert np.abs(np.diff(noise, axis=1)).max() < 0.5  # neighbours differ little


@pytest.mark.parametrize("kind, size, contrast, image, message", [
    ("dent", 5, 0.5, _image(), "unknown defect kind"),
    ("spot", 0, 0.5, _image(), "size must be > 0"),
    ("spot", 5, 0.0, _image(), "contrast in"),
    ("spot", 5, 1.5, _image(), "contrast in"),
    ("spot", 5, 0.5, _image().astype(np.float32), "uint8 HxWxC"),
])
def test_bad_arguments_are_refused(kind, size, contrast, image, message):
    with pytest.raises(ValueError, match=message):
        implant(image, kind, size, contrast, np.random.default_rng(0))
