"""Tiling for patch models: grids flush with the edges at odd sizes, tiny images padded to one patch,
one forward per micro-batch split back per image, top-k image scores, maps at each image's size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ama_stream.checkpoint import Checkpoint
from ama_stream.model import AMA, ModelConfig
from ama_stream.preprocess import PreprocessSpec, fit_image
from ama_stream.scoring import Scorer
from ama_stream.tiling import hottest_region, map_shape, scale_region
from ama_stream.tiling import image_scores, positions, stitch_map, tile_images

SPEC = PreprocessSpec(image_size=16, channels=1, patch_stride=8, scale=0.5)


@pytest.mark.parametrize("length, patch, stride, want", [
    (16, 16, 8, (0,)), (10, 16, 8, (0,)), (17, 16, 8, (0, 1)), (40, 16, 8, (0, 8, 16, 24)),
    (41, 16, 8, (0, 8, 16, 24, 25)), (33, 16, 16, (0, 16, 17)),
])
def test_positions_cover_every_pixel_flush_with_the_far_edge(length, patch, stride, want):
    got = positions(length, patch, stride)
    assert got == want
    covered = np.zeros(max(length, patch), bool)
    for start in got:
        covered[start:start + patch] = True
    assert covered[:length].all() and got[-1] + patch >= length


def test_fit_keeps_the_aspect_and_pads_tiny_images_to_one_patch():
    wide = fit_image(np.zeros((61, 203), np.uint8), SPEC)
    assert wide.shape == (30, 102, 1) or wide.shape == (31, 102, 1)  # 0.5 x (61, 203), rounded
    tiny = fit_image(np.full((5, 9, 3), 200, np.uint8), SPEC)  # 0.5x -> 2x4, padded to one 16x16 patch
    assert tiny.shape == (16, 16, 1) and (tiny == tiny[0, 0]).all()  # edge-padded: no dark frame


def test_tile_batch_splits_back_per_image_for_odd_tiny_and_one_patch_images():
    images = [np.random.default_rng(i).integers(0, 255, shape, dtype=np.uint8)
              for i, shape in enumerate([(61, 203), (5, 9, 3), (32, 32), (47, 33, 3)])]
    batch = tile_images(images, SPEC)
    counts = [g.count for g in batch.grids]
    assert counts == [len(positions(g.height, 16, 8)) * len(positions(g.width, 16, 8)) for g in batch.grids]
    assert counts[1] == 1 and counts[2] == 1  # tiny and exactly-one-patch images: one input each
    assert batch.tiles.shape == (sum(counts), 16, 16, 1)
    assert [len(part) for part in batch.split(np.arange(sum(counts)))] == counts
    assert len(batch[1:3]) == 2 and len(batch[1:3].tiles) == counts[1] + counts[2]
    assert [g.native for g in batch.grids] == [(61, 203), (5, 9), (32, 32), (47, 33)]


def test_image_score_is_the_mean_of_the_top_k_patches_and_nan_is_never_hidden():
    batch = tile_images([np.zeros((64, 32), np.uint8), np.zeros((32, 32), np.uint8)], SPEC)
    n0 = batch.grids[0].count
    values = np.concatenate([np.arange(n0, dtype=float), [5.0]])
    assert image_scores(values, batch, 1).tolist() == [n0 - 1, 5.0]
    assert image_scores(values, batch, 3)[0] == pytest.approx(np.mean([n0 - 1, n0 - 2, n0 - 3]))
    values[0] = np.nan
    assert np.isnan(image_scores(values, batch, 1)[0])


def test_stitched_map_has_the_image_size_and_puts_a_hot_patch_where_it_was():
    image = np.zeros((70, 150), np.uint8)
    batch = tile_images([image], SPEC)
    grid = batch.grids[0]
    cells = torch.zeros(grid.count, 2, 2)
    hot = grid.shape[1] * 1 + 3  # row 1, column 3 of the patch grid
    cells[hot] = 10.0
    m = stitch_map(cells, grid, SPEC)
    assert m.shape == (70, 150) and m.dtype == np.float32
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    # patch (1, 3) starts at (8, 24) on the half-scale image: (16, 48) .. (48, 80) in the image's pixels
    assert 16 <= y < 48 and 48 <= x < 80
    bx, by, bw, bh = hottest_region(m)
    assert 12 <= by <= y < by + bh <= 52 and 44 <= bx <= x < bx + bw <= 84


def test_whole_image_model_map_undoes_the_fit():
    spec = PreprocessSpec(image_size=16, channels=1)
    for shape in [(13, 14), (40, 90)]:  # padded, resized
        batch = tile_images([np.zeros(shape, np.uint8)], spec)
        assert batch.grids[0].count == 1
        assert stitch_map(torch.rand(1, 2, 2), batch.grids[0], spec).shape == shape


def test_a_bounded_map_keeps_the_aspect_and_its_region_is_in_the_image_pixels():
    assert map_shape((4096, 2048), 512) == (512, 256) and map_shape((70, 150), 512) == (70, 150)
    assert scale_region((10, 20, 5, 4), (512, 256), (4096, 2048)) == (80, 160, 40, 32)
    assert scale_region((250, 500, 6, 12), (512, 256), (4096, 2048)) == (2000, 4000, 48, 96)  # clipped
    image = np.zeros((1400, 600), np.uint8)
    image[1000:1100, 100:200] = 255
    scorer = _scorer(SPEC)
    full, = scorer.inspect([image])
    small, = scorer.inspect_tiles(scorer.prepare([image]), max_side=200)
    assert full.map.shape == (1400, 600) and small.map.shape == map_shape((1400, 600), 200) == (200, 86)
    assert small.score == pytest.approx(full.score)
    fx, fy, fw, fh = full.region  # the same box, up to the coarser map's pixels (7 image pixels each)
    sx, sy, sw, sh = small.region
    assert abs(fx - sx) <= 8 and abs(fy - sy) <= 8 and abs(fx + fw - sx - sw) <= 8 and abs(fy + fh - sy - sh) <= 8


def _scorer(spec: PreprocessSpec) -> Scorer:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=spec.image_size, channels=spec.channels, nz=8, enc_width=4, gen_width=8, disc_width=8)
    return Scorer(Checkpoint(cfg, spec, AMA(cfg).state_dict(), 0.0, 1.0), "cpu", max_patches=7)


def test_scorer_scores_a_micro_batch_in_one_pass_equal_to_image_by_image():
    scorer = _scorer(SPEC)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, s, dtype=np.uint8) for s in [(61, 203), (5, 9, 3), (47, 33, 3)]]
    together = scorer.score_images(images).r
    alone = np.array([scorer.score_images([img]).r[0] for img in images])
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    inspected = scorer.inspect(images)
    np.testing.assert_allclose([i.score for i in inspected], together, rtol=1e-5)  # the map's forward gives R too
    assert [i.map.shape for i in inspected] == [img.shape[:2] for img in images]
    assert all(i.map.dtype == np.float32 and (i.map >= 0).all() for i in inspected)
    maps = scorer.anomaly_maps(images)
    assert [m.shape for m in maps] == [img.shape[:2] for img in images]
    fitted = scorer.fit(images)
    np.testing.assert_allclose(scorer.r_scores(fitted, batch_size=2), together, rtol=1e-5)


# --- per-position statistics (aligned parts) --------------------------------------------------------

ALIGNED = PreprocessSpec(image_size=16, channels=1, patch_stride=8, scale=0.5, frame_size=(24, 40))


def test_an_aligned_model_brings_every_image_to_its_working_size():
    assert fit_image(np.zeros((48, 80), np.uint8), ALIGNED).shape == (24, 40, 1)  # the training size, scaled
    assert fit_image(np.zeros((50, 90), np.uint8), ALIGNED).shape == (24, 40, 1)  # another size: resized
    with pytest.raises(ValueError, match="frame_size"):
        PreprocessSpec(image_size=16, channels=1, frame_size=(24, 40))  # not a patch model


def test_position_stats_roundtrip_change_the_model_id_and_turn_scores_into_z(tmp_path):
    from ama_stream.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from training.trainer import fit_position_stats

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, channels=1, nz=8, enc_width=4, gen_width=8, disc_width=8)
    ckpt = Checkpoint(cfg, ALIGNED, AMA(cfg).state_dict(), 0.0, 1.0)
    plain = Scorer(ckpt, "cpu")
    rng = np.random.default_rng(0)
    good = [np.clip(rng.normal(120, 10, (48, 80)), 0, 255).astype(np.uint8) for _ in range(12)]
    stats, fit_scores = fit_position_stats(plain, plain.fit(good), top_k=1, batch=5)
    assert stats["patch_mean"].shape == plain.prepare(good[:1]).grids[0].shape and stats["map_mean"].shape == (24, 40)
    assert (stats["patch_std"] > 0).all() and (stats["map_std"] > 0).all()
    save_checkpoint(ckpt, tmp_path / "plain.pt")
    ckpt.position_stats = stats
    save_checkpoint(ckpt, tmp_path / "aligned.pt")
    loaded = load_checkpoint(tmp_path / "aligned.pt")
    assert loaded.model_id != load_checkpoint(tmp_path / "plain.pt").model_id
    aligned = Scorer(loaded, "cpu")
    np.testing.assert_allclose(aligned.score_images(good).r, fit_scores, rtol=1e-4, atol=1e-4)
    spot = good[0].copy()
    spot[20:30, 30:40] = 250  # a bright spot where the good images are plain
    inspected = aligned.inspect([good[1], spot])
    assert inspected[1].score > inspected[0].score and inspected[1].map.shape == (48, 80)
    x, y, w, h = inspected[1].region
    assert x < 40 and x + w > 30 and y < 30 and y + h > 20  # the hottest region overlaps the spot
    bad = dict(stats, patch_std=torch.zeros_like(stats["patch_std"]))
    ckpt.position_stats = bad
    save_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="positive stds"):
        load_checkpoint(tmp_path / "bad.pt")
