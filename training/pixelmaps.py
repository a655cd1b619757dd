"""Anomaly maps in evaluation: one 8-bit PNG per test image, and pixel-level metrics against masks.

Pixel metrics are those MVTec AD users compare (Bergmann et al. 2019/2021):
- pixel AUROC: every pixel of every test image is a sample, defect pixels (mask != 0) positive;
- AUPRO: the per-region overlap (the share of each connected defect region above a threshold,
  averaged over regions) integrated over the false-positive rate of defect-free pixels from 0 to
  0.3, divided by 0.3 (1 = perfect, ~0.15 = chance with the 0.3 limit).
Both are computed at each image's native resolution, streaming: map values are binned on 4096
quantile edges of the run's maps, so memory does not grow with the pixel count and the ranking
error is below the bins' width.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ama_stream.fileio import atomic_write_bytes
from ama_stream.images import DataError, decode_image
from ama_stream.source_catalogs import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

BINS = 4096
PRO_FPR_LIMIT = 0.3


def inspect_set(scorer, images, shapes, batch_size: int = 16, desc: str | None = None):
    """Scores and anomaly maps of fitted test images in one forward per chunk: (scores float64 [N],
    maps: float16 arrays at each image's native size from `shapes` [N, >=2], regions (x, y, w, h))."""
    from ama_stream.progress import progress

    scores, maps, regions = [], [], []
    with progress(total=len(images), desc=desc or "scoring and mapping test images", unit="img") as bar:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            for item in scorer.inspect_tiles(scorer.tile(chunk, shapes[i:i + batch_size])):
                scores.append(item.score)
                maps.append(item.map.astype(np.float16))
                regions.append(item.region)
            bar.update(len(chunk))
    return np.asarray(scores, np.float64), maps, regions


def map_name(image_id: str) -> str:
    """The PNG a map is written to: the image's folder name and file stem (`data/defects/part_017.jpg`
    -> `defects/part_017.png`, so a good and a defective image of one name do not clash; an item of a
    file of many images, `FILE#INDEX`, -> `FOLDER/STEM_INDEX.png`)."""
    path, _, index = image_id.partition("#")
    p = Path(path)
    return f"{p.parent.name or '.'}/{p.stem}{'_' + index if index else ''}.png"


def value_range(maps) -> tuple[float, float]:
    lo = min(float(np.min(m)) for m in maps)
    hi = max(float(np.max(m)) for m in maps)
    return lo, hi if hi > lo else lo + 1.0


def to_uint8(anomaly_map: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """One scale for the whole run: lo -> 0 (least anomalous), hi -> 255 (most)."""
    return np.clip(np.rint((anomaly_map.astype(np.float32) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def write_maps(out_dir: str | Path, ids, maps, lo: float, hi: float) -> list[str]:
    """8-bit PNGs named by each image's folder and file stem (map_name), the image's own size; returns
    the file names. Two images with the same name (a.jpg and a.png in one folder) are refused."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [map_name(i) for i in ids]
    seen: dict[str, str] = {}
    for image_id, name in zip(ids, names):
        if name in seen:
            raise ValueError(f"two test images would both write the map {name}: {seen[name]} and {image_id}")
        seen[name] = image_id
    for name, anomaly_map in zip(names, maps):
        buf = io.BytesIO()
        Image.fromarray(to_uint8(anomaly_map, lo, hi), mode="L").save(buf, format="PNG")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / name, buf.getvalue())
    return names


def mask_index(root: str | Path) -> dict[str, Path]:
    """file stem -> mask file, for every image file under `root` (recursively)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of masks")
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            index.setdefault(path.stem, path)
    if not index:
        raise DataError(f"{root}: holds no mask images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return index


def read_mask(index: dict[str, Path], image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: the mask named like the image (nonzero = defect), or all False when there is none.
    A mask of another size than its image is an error naming both."""
    path = index.get(Path(image_id.split("#", 1)[0]).stem)
    if path is None:
        return np.zeros(shape, bool)
    mask = decode_image(path.read_bytes(), str(path))
    mask = mask if mask.ndim == 2 else mask.max(axis=2)
    if mask.shape != tuple(shape):
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_id} is "
                        f"{shape[1]}x{shape[0]}")
    return mask > 0


def quantile_edges(maps, bins: int = BINS, sample: int = 20000, seed: int = 0) -> np.ndarray:
    """bins - 1 increasing edges at quantiles of the maps' values (a seeded sample of each map)."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([m.ravel()[rng.integers(0, m.size, min(sample, m.size))] for m in maps]).astype(np.float64)
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


class PixelMetrics:
    """Accumulates (map, mask) pairs image by image; `result()` gives pixel AUROC and AUPRO."""

    def __init__(self, edges: np.ndarray):
        self.edges = edges
        n = len(edges) + 1
        self.negative = np.zeros(n, np.int64)
        self.positive = np.zeros(n, np.int64)
        self.regions: list[np.ndarray] = []  # per defect region: its pixels per bin

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"map {anomaly_map.shape} and mask {mask.shape} differ in size")
        n = len(self.edges) + 1
        bins = np.searchsorted(self.edges, anomaly_map.astype(np.float64), side="right")
        self.negative += np.bincount(bins[~mask], minlength=n)
        if mask.any():
            self.positive += np.bincount(bins[mask], minlength=n)
            labels, count = ndimage.label(mask)
            for k in range(1, count + 1):
                self.regions.append(np.bincount(bins[labels == k], minlength=n))

    def result(self) -> dict:
        if not self.positive.sum() or not self.negative.sum():
            return {}
        # threshold at each bin from the top: the share of each class at or above it
        tpr = np.cumsum(self.positive[::-1]) / self.positive.sum()
        fpr = np.cumsum(self.negative[::-1]) / self.negative.sum()
        tpr, fpr = np.concatenate([[0.0], tpr]), np.concatenate([[0.0], fpr])
        auroc = _trapezoid(tpr, fpr)
        pro = np.mean([np.cumsum(r[::-1]) / r.sum() for r in self.regions], axis=0)
        pro = np.concatenate([[0.0], pro])
        return {"pixel_auroc": auroc, "aupro": _area_to(fpr, pro, PRO_FPR_LIMIT) / PRO_FPR_LIMIT,
                "defect_regions": len(self.regions)}


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under the curve y(x) (x increasing) from 0 to `limit`, interpolating at the limit."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit and keep.sum() < len(x):
        nxt = int(np.argmax(~keep))
        y_at = np.interp(limit, [x[nxt - 1], x[nxt]], [y[nxt - 1], y[nxt]])
        xs, ys = np.append(xs, limit), np.append(ys, y_at)
    return _trapezoid(ys, xs)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
