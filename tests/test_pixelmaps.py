"""Pixel metrics (pixel AUROC, AUPRO) against known answers, and the map file contract of
`evaluate --maps`: PNGs named by file stem, each image's own size, one 8-bit scale for the run."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from ama_stream.images import DataError
from training import pixelmaps


def _masks(seed: int = 0):
    rng = np.random.default_rng(seed)
    masks = [np.zeros((40, 60), bool) for _ in range(4)]
    masks[1][5:12, 10:20] = True
    masks[2][30:33, 40:44] = True
    masks[2][2:4, 2:4] = True
    return masks, rng


def _metrics(maps, masks) -> dict:
    metrics = pixelmaps.PixelMetrics(pixelmaps.quantile_edges(maps))
    for m, k in zip(maps, masks):
        metrics.add(m, k)
    return metrics.result()


def test_a_perfect_map_scores_one_and_an_inverted_one_zero():
    masks, rng = _masks()
    perfect = [k.astype(np.float32) + rng.uniform(0, 0.1, k.shape).astype(np.float32) for k in masks]
    got = _metrics(perfect, masks)
    assert got["pixel_auroc"] == pytest.approx(1.0) and got["aupro"] == pytest.approx(1.0, abs=1e-3)
    assert got["defect_regions"] == 3
    inverted = [1.0 - m for m in perfect]
    got = _metrics(inverted, masks)
    assert got["pixel_auroc"] == pytest.approx(0.0, abs=1e-3) and got["aupro"] == pytest.approx(0.0, abs=1e-3)


def test_pixel_auroc_matches_sklearn_on_a_noisy_map():
    masks, rng = _masks(1)
    maps = [(k * 0.5 + rng.normal(0, 0.5, k.shape)).astype(np.float32) for k in masks]
    want = roc_auc_score(np.concatenate([k.ravel() for k in masks]), np.concatenate([m.ravel() for m in maps]))
    assert _metrics(maps, masks)["pixel_auroc"] == pytest.approx(want, abs=2e-3)


def test_aupro_weighs_regions_equally_not_pixels():
    """A map that finds the big region but misses both small ones: high pixel AUROC, low AUPRO."""
    masks, _ = _masks()
    maps = [np.zeros(k.shape, np.float32) for k in masks]
    maps[1][5:12, 10:20] = 1.0
    got = _metrics(maps, masks)
    assert got["pixel_auroc"] > 0.7 and got["aupro"] < 0.5


def test_map_files_are_named_by_stem_sized_like_their_images_on_one_scale(tmp_path):
    maps = [np.zeros((7, 9), np.float32), np.full((12, 5), 3.0, np.float32), np.linspace(0, 6, 20).reshape(4, 5)]
    ids = ["/data/good/a_001.jpg", "/data/defect/b.png", "cells.npz#17"]
    lo, hi = pixelmaps.value_range(maps)
    names = pixelmaps.write_maps(tmp_path, ids, maps, lo, hi)
    assert names == ["good/a_001.png", "defect/b.png", "./cells_17.png"]
    read = [np.asarray(Image.open(tmp_path / n)) for n in names]
    assert [r.shape for r in read] == [(7, 9), (12, 5), (4, 5)] and all(r.dtype == np.uint8 for r in read)
    assert read[0].max() == 0 and read[1].min() == 128 and read[2].max() == 255  # 3 of 0..6 -> 128: one scale


def test_two_images_with_one_name_are_refused_one_stem_in_two_folders_is_not(tmp_path):
    assert pixelmaps.write_maps(tmp_path, ["x/a.jpg", "y/a.png"], [np.zeros((2, 2))] * 2, 0.0, 1.0) == \
        ["x/a.png", "y/a.png"]
    with pytest.raises(ValueError, match="would both write the map x/a.png"):
        pixelmaps.write_maps(tmp_path, ["x/a.jpg", "x/a.png"], [np.zeros((2, 2))] * 2, 0.0, 1.0)


def test_masks_by_stem_missing_means_defect_free_and_a_wrong_size_is_an_error(tmp_path):
    Image.fromarray(np.pad(np.full((2, 2), 255, np.uint8), 1)).save(tmp_path / "part_1.png")
    index = pixelmaps.mask_index(tmp_path)
    assert pixelmaps.read_mask(index, "/any/where/part_1.jpg", (4, 4)).sum() == 4
    assert not pixelmaps.read_mask(index, "/any/where/part_2.jpg", (4, 4)).any()
    with pytest.raises(DataError, match="mask is 4x4 but its image"):
        pixelmaps.read_mask(index, "part_1.jpg", (5, 4))
    with pytest.raises(DataError, match="no such folder"):
        pixelmaps.mask_index(tmp_path / "nope")
