"""Cutting images into the model's inputs, and putting per-input results back together.

A whole-image model sees each image once, fitted to its input size. A patch model sees each image
at its working scale (aspect kept) as overlapping square patches of its input size, `patch_stride`
apart, the last row and column flush with the image's far edges so every pixel is covered. Both
are a `TileBatch`: the inputs of a batch of images in one uint8 array and, per image, its
`TileGrid`, so that one forward scores every patch of a micro-batch and the results split back
per image: patch scores into an image score (`image_scores`), per-patch maps into one map over
the image at its own size (`stitch_map`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .preprocess import PreprocessSpec, fit_image, fit_reasons, native_shape


def positions(length: int, patch: int, stride: int) -> tuple[int, ...]:
    """Start offsets of patches along one side: 0, stride, 2 stride, ... and length - patch last."""
    if length <= patch:
        return (0,)
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return tuple(starts)


@dataclass(frozen=True)
class TileGrid:
    """Where one image's inputs come from: patch (y, x) corners on the fitted image, row-major."""

    height: int  # the fitted image (what the patches cover)
    width: int
    patch: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    native: tuple[int, int]  # (height, width) of the image as it arrived: maps are returned at this size

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        return len(self.ys), len(self.xs)


def grid_for(fitted: np.ndarray, native: tuple[int, int], spec: PreprocessSpec) -> TileGrid:
    h, w = fitted.shape[:2]
    if not spec.patched:
        return TileGrid(h, w, spec.image_size, (0,), (0,), native)
    stride = spec.patch_stride
    return TileGrid(h, w, spec.image_size, positions(h, spec.image_size, stride), positions(w, spec.image_size, stride),
                    native)


def cut(fitted: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The grid's patches of a fitted image, uint8 [count, P, P, C] (a whole-image model: the image)."""
    p = grid.patch
    if grid.count == 1 and fitted.shape[:2] == (p, p):
        return fitted[None]
    return np.stack([fitted[y:y + p, x:x + p] for y in grid.ys for x in grid.xs])


@dataclass
class TileBatch:
    """Every model input of a batch of images, and per image its grid."""

    tiles: np.ndarray  # uint8 [n, P, P, C], the images' patches in order
    grids: list[TileGrid]

    def __len__(self) -> int:
        return len(self.grids)

    @property
    def bounds(self) -> np.ndarray:
        """int64 [B + 1]: image i's patches are tiles[bounds[i]:bounds[i + 1]]."""
        return np.concatenate([[0], np.cumsum([g.count for g in self.grids])]).astype(np.int64)

    def __getitem__(self, images: slice) -> "TileBatch":
        """The images `images` (a slice) with their patches."""
        return self.select(range(len(self.grids))[images])

    def select(self, indices) -> "TileBatch":
        bounds = self.bounds
        parts = [self.tiles[bounds[i]:bounds[i + 1]] for i in indices]
        tiles = np.concatenate(parts) if parts else self.tiles[:0]
        return TileBatch(tiles, [self.grids[i] for i in indices])

    def split(self, values):
        """Per-patch values (first axis n) -> one slice per image."""
        bounds = self.bounds
        return [values[bounds[i]:bounds[i + 1]] for i in range(len(self.grids))]


def empty_batch(spec: PreprocessSpec) -> TileBatch:
    p = spec.image_size
    return TileBatch(np.zeros((0, p, p, spec.channels), np.uint8), [])


def tile_fitted(fitted_images, natives, spec: PreprocessSpec) -> TileBatch:
    """Images already fitted (preprocess.fit_image) -> their TileBatch; `natives`: their (h, w) as they arrived."""
    if len(fitted_images) == 0:
        return empty_batch(spec)
    grids = [grid_for(img, native, spec) for img, native in zip(fitted_images, natives)]
    return TileBatch(np.concatenate([cut(img, g) for img, g in zip(fitted_images, grids)]), grids)


def tile_images(images, spec: PreprocessSpec) -> TileBatch:
    """Decoded uint8 images (any sizes) -> their TileBatch, one image fitted at a time."""
    fitted, natives = [], []
    for img in images:
        fitted.append(fit_image(img, spec))
        natives.append(native_shape(img)[:2])
    return tile_fitted(fitted, natives, spec)


def image_scores(patch_scores: np.ndarray, batch: TileBatch, top_k: int) -> np.ndarray:
    """Per image, the mean of its top_k patch scores (top_k = 1: the max), float64 [B]. A NaN patch
    score makes the image's score NaN: a broken score is never hidden by the others."""
    out = np.empty(len(batch), np.float64)
    for i, scores in enumerate(batch.split(np.asarray(patch_scores, np.float64))):
        if np.isnan(scores).any():
            out[i] = np.nan
            continue
        k = min(top_k, len(scores))
        out[i] = float(np.mean(np.partition(scores, len(scores) - k)[-k:]))
    return out


def stitch(cell_maps: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Per-patch maps [count, h, w] (the critic's resolution) -> one float32 map over the fitted image
    [height, width]: each patch's map upsampled bilinearly to the patch, overlaps averaged."""
    p = grid.patch
    up = F.interpolate(cell_maps.float()[:, None], size=(p, p), mode="bilinear", align_corners=False)[:, 0]
    canvas = torch.zeros(grid.height, grid.width)
    counts = torch.zeros(grid.height, grid.width)
    for k, (y, x) in enumerate((y, x) for y in grid.ys for x in grid.xs):
        canvas[y:y + p, x:x + p] += up[k]
        counts[y:y + p, x:x + p] += 1
    return canvas / counts.clamp_min(1)


def stitch_map(cell_maps: torch.Tensor, grid: TileGrid, spec: PreprocessSpec) -> np.ndarray:
    """Per-patch maps -> one float32 map of the image at its own size [native_h, native_w] (stitch,
    then brought back from the working scale, or the whole-image fit, to the image's size)."""
    return to_native(stitch(cell_maps, grid), grid, spec)


def map_shape(native: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The size a map of an image of `native` (h, w) is returned at: the native size, or shrunk (same
    aspect) so its longer side is at most `max_side`."""
    nh, nw = native
    factor = 1.0 if max_side is None else min(1.0, max_side / max(nh, nw))
    return max(1, round(nh * factor)), max(1, round(nw * factor))


def to_native(canvas: torch.Tensor, grid: TileGrid, spec: PreprocessSpec, max_side: int | None = None) -> np.ndarray:
    """A map over the fitted image -> float32 [native_h, native_w]: the fit undone (padding dropped,
    resized to the native size; with `max_side`, to that size shrunk as map_shape says)."""
    nh, nw = grid.native
    if spec.patched and not spec.frame_size:  # padded at the bottom/right only when the scaled image was under one patch
        canvas = canvas[:max(1, round(nh * spec.scale)), :max(1, round(nw * spec.scale))]
    elif "padded" in fit_reasons((nh, nw, spec.channels), spec):  # centred, as fit_image pads
        top, left = (grid.height - nh) // 2, (grid.width - nw) // 2
        canvas = canvas[top:top + nh, left:left + nw]
    size = map_shape((nh, nw), max_side)
    if tuple(canvas.shape) != size:
        canvas = F.interpolate(canvas[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return canvas.contiguous().numpy()


def scale_region(region: tuple[int, int, int, int], map_size: tuple[int, int],
                 native: tuple[int, int]) -> tuple[int, int, int, int]:
    """An (x, y, w, h) box in the pixels of a map of `map_size` (h, w) -> the same box in the image's
    native pixels (widened outwards to whole pixels, clipped to the image)."""
    (mh, mw), (nh, nw) = map_size, native
    x, y, w, h = region
    x0, y0 = int(np.floor(x * nw / mw)), int(np.floor(y * nh / mh))
    x1, y1 = min(nw, int(np.ceil((x + w) * nw / mw))), min(nh, int(np.ceil((y + h) * nh / mh)))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def hottest_region(anomaly_map: np.ndarray, level: float = 0.5) -> tuple[int, int, int, int]:
    """(x, y, w, h) in the map's pixels: the bounding box of the connected area around the map's
    maximum where the map is at least `level` of the way from its median to that maximum."""
    peak = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    top, base = float(anomaly_map[peak]), float(np.median(anomaly_map))
    hot = anomaly_map >= base + level * (top - base)
    labels, _ = ndimage.label(hot)
    ys, xs = np.nonzero(labels == labels[peak])
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
