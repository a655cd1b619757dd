"""Image data sources (`FORMAT:ROOT`): parsing, and reading lazily (runtime) or in bulk (training).

Formats (README, "Data sources are written FORMAT:ROOT"):

  idx     an MNIST-family directory: `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, gzipped or plain.
  folder  one subfolder per class holding PNG/JPEG/BMP files (searched recursively inside a class
          folder); a folder with images and no subfolders is one class named after the folder. A root
          with `train/` and `test/` subfolders (cifar10-jpeg, MVTec AD) has a built-in split, each half
          laid out as above; other subfolders of such a root (e.g. `ground_truth/`) are ignored.
  elpv    ELPV solar cells: `labels.csv` rows `PATH PROBABILITY TYPE`; the classes are the defect
          probabilities (0, 0.333, 0.667, 1.0), `cell_type` keeps only mono or poly cells.
  npz     one .npz file: `images` uint8 N,H,W[,C] and optional integer `labels` (no pickles).

Decoded images are uint8 HxW for gray files (1-bit, L, LA, and 16-bit, which is scaled to 8 bit with
round(v / 257)) and HxWx3 for everything else (alpha dropped, palettes expanded); idx and npz give
their arrays as stored. Labels index `class_names`: the integer label for idx/npz (class names "0".."K-1"),
the sorted folder names or defect probabilities for folder/elpv, -1 for an npz without labels.

Splits: idx and a train/test folder have their own. Every other source is split per item by a hash of
(seed, the item's path relative to the root) against `test_fraction`: an item keeps its side when
files are added, and one class's split does not depend on which other classes are selected.
`split: null` reads everything (`all`) unless the caller (a protocol) chooses.

Bad data raises DataError naming the file and the problem. An undecodable image in a folder/elpv
source stops the load unless the source sets `skip_corrupt: true`, which logs and skips it.
PIL's decompression-bomb limit stays on: an image over `Image.MAX_IMAGE_PIXELS` is a DataError.

Bulk loads of folder/elpv sources keep the fitted arrays in an on-disk cache (ama_stream.imagecache;
AMA_CACHE_DIR=off disables it), so CIFAR-10 is decoded once, not on every run.

The jobs live in three modules; this one is the public face (import from here):
  source_spec.py      SourceSpec, parse_source, resolve_data_root, resolve_root (the spec's form)
  source_catalogs.py  one catalogue per format: items listed without decoding, and a reader
  sources.py          selection (classes, seeded split), the image cache, load_images / iter_images
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from . import imagecache, images, preprocess, source_catalogs
from .images import DataError, decode_image, pil_to_uint8  # noqa: F401 -- part of this module's API
from .preprocess import PreprocessSpec, fit_image
from .progress import progress
from .source_catalogs import IMAGE_EXTENSIONS, Catalog, catalog  # noqa: F401 -- part of this module's API
from .source_spec import (  # noqa: F401 -- part of this module's API
    DATA_ROOT_ENV,
    DEFAULT_TEST_FRACTION,
    FORMATS,
    SourceSpec,
    is_kafka_source,
    parse_source,
    resolve_data_root,
    resolve_root,
)

log = logging.getLogger(__name__)

CACHE_MIN_IMAGES = 256  # smaller selections decode about as fast as the cache bookkeeping
ELPV_TOLERANCE = 0.01  # 0.333 in a config matches 0.3333333333333333 in labels.csv


# --------------------------------------------------------------------------- selection


def _hash_is_test(keys: Sequence[str], seed: int, test_fraction: float) -> np.ndarray:
    """Per-item seeded split: test iff hash(seed, key) falls below test_fraction."""
    cut = int(test_fraction * 2**64)
    prefix = f"{seed}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "big") < cut for k in keys),
        dtype=bool, count=len(keys),
    )


def _class_labels(cat: Catalog, spec: SourceSpec) -> list[int]:
    assert spec.classes is not None
    if not cat.class_names:
        raise DataError(f"{cat.root}: has no labels, so classes {list(spec.classes)} cannot be selected")
    chosen = []
    for wanted in spec.classes:
        if spec.format == "elpv":
            hits = [k for k, v in enumerate(cat.class_values) if abs(float(v) - float(wanted)) <= ELPV_TOLERANCE]
        else:
            hits = [k for k, v in enumerate(cat.class_values) if v == wanted]
        if not hits:
            raise DataError(f"{cat.root}: unknown class {wanted!r}; available: {', '.join(cat.class_names)}")
        chosen.extend(hits)
    return chosen


def _select(cat: Catalog, spec: SourceSpec, seed: int, test_fraction: float) -> np.ndarray:
    mask = np.ones(len(cat.ids), dtype=bool)
    if spec.classes is not None:
        mask &= np.isin(cat.labels, _class_labels(cat, spec))
    split = spec.split or "all"
    if split != "all":
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
        is_test = cat.is_test if cat.is_test is not None else _hash_is_test(cat.keys, seed, test_fraction)
        mask &= is_test if split == "test" else ~is_test
    chosen = np.flatnonzero(mask)
    if chosen.size == 0:
        raise DataError(f"{spec}: no images selected in {cat.root}")
    return chosen


def has_builtin_split(spec: SourceSpec, data_root: str | os.PathLike | None = None) -> bool:
    """True for idx and for a folder root with train/ and test/ subfolders."""
    if spec.format == "idx":
        return True
    if spec.format == "folder":
        root = resolve_root(spec, data_root)
        return (root / "train").is_dir() and (root / "test").is_dir()
    return False


SHAPE_SAMPLE = 500  # files whose headers decide an automatic model size


def native_shapes(spec: SourceSpec, data_root: str | os.PathLike | None = None, *, seed: int = 0,
                  limit: int = SHAPE_SAMPLE) -> np.ndarray:
    """(height, width, channels) int32 [n, 3] of up to `limit` selected items (a seeded sample),
    from file headers only for decoded formats; unreadable headers are left out."""
    cat = catalog(spec, resolve_root(spec, data_root))
    chosen = _select(cat, spec.with_split(None), seed, DEFAULT_TEST_FRACTION)
    if len(chosen) > limit:
        chosen = np.sort(np.random.default_rng(seed).choice(chosen, limit, replace=False))
    shapes = []
    for i in chosen:
        if not cat.decoded:
            shapes.append(preprocess.native_shape(cat.read(i)))
            continue
        try:
            with Image.open(cat.ids[i]) as im:
                w, h = im.size
                channels = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else 3
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        shapes.append((h, w, channels))
    return np.asarray(shapes, dtype=np.int32).reshape(-1, 3)


def source_classes(spec: SourceSpec, data_root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Every class name of the source (ignoring the spec's class selection); () when unlabeled."""
    return catalog(spec, resolve_root(spec, data_root)).class_names


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LabeledImages:
    images: np.ndarray  # uint8 [N, S, S, C], fitted to the model size (a patch model: object array of HxWxC)
    labels: np.ndarray  # int64 [N]: index into class_names; -1 for an npz without labels
    class_names: tuple[str, ...]  # every class of the source, not only the selected ones
    ids: tuple[str, ...]  # file paths, or FILE#INDEX
    shapes: np.ndarray | None = None  # int32 [N, 3]: each image's native (height, width, channels)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray | Sequence[int]) -> "LabeledImages":
        indices = np.asarray(indices, dtype=np.int64)
        return LabeledImages(self.images[indices], self.labels[indices], self.class_names,
                             tuple(self.ids[i] for i in indices),
                             None if self.shapes is None else self.shapes[indices])


@functools.lru_cache(maxsize=1)
def _decoder_digest() -> str:
    """Identifies the decoding and fitting code, so that editing it invalidates cached images."""
    digest = hashlib.sha256()
    for module_file in (__file__, source_catalogs.__file__, images.__file__, preprocess.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()


SKIP_NAMED = 5  # undecodable files named one by one before only the count goes on


def _decode_fitted(cat: Catalog, chosen: np.ndarray, image_spec: PreprocessSpec,
                   skip_corrupt: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fitted images of the decodable items, mask of those items over `chosen`, their native shapes).
    A patch model's images keep their own sizes: an object array of HxWxC arrays."""
    s, c = image_spec.image_size, image_spec.channels
    images = np.empty(len(chosen), dtype=object) if image_spec.patched else np.empty((len(chosen), s, s, c), np.uint8)
    shapes = np.zeros((len(chosen), 3), dtype=np.int32)
    kept = np.ones(len(chosen), dtype=bool)
    bar = progress(total=len(chosen), desc=f"decoding {cat.root.name}", unit="img") if cat.decoded else None
    for j, i in enumerate(chosen):
        if bar is not None:
            bar.update(1)
        try:
            native = cat.read(i)
        except DataError as exc:
            if not skip_corrupt:
                raise
            if (~kept).sum() < SKIP_NAMED:
                log.warning("skipping an undecodable image: %s", exc)
            kept[j] = False
            continue
        try:
            images[j] = fit_image(native, image_spec)
        except ValueError as exc:
            raise DataError(f"{cat.ids[i]}: {exc}") from None
        shapes[j] = preprocess.native_shape(native)
    if bar is not None:
        bar.close()
    if kept.all():
        return images, kept, shapes
    return images[kept], kept, shapes[kept]


def load_images(
    spec: SourceSpec,
    data_root: str | os.PathLike | None,
    image_spec: PreprocessSpec,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> LabeledImages:
    """Every selected image, decoded and fitted to `image_spec` with preprocess.fit_image.

    `seed` and `test_fraction` define the split of sources without a built-in one. Decoded
    sources (folder, elpv) of CACHE_MIN_IMAGES or more go through the on-disk imagecache.
    """
    cat = catalog(spec, resolve_root(spec, data_root))
    chosen = _select(cat, spec, seed, test_fraction)
    key = None
    cacheable = not image_spec.patched  # the cache holds fixed-size arrays; a patch model's images vary
    if cacheable and cat.decoded and len(chosen) >= CACHE_MIN_IMAGES and imagecache.cache_dir() is not None:
        params = {"preprocess": image_spec.to_dict(), "skip_corrupt": spec.skip_corrupt, "code": _decoder_digest()}
        key = imagecache.entry_key([cat.ids[i] for i in chosen], params)
    shape = (image_spec.image_size, image_spec.image_size, image_spec.channels)
    hit = imagecache.load(key, len(chosen), shape) if key else None
    if hit is not None:
        images, kept, shapes = hit
        log.info("read %d fitted images of %s from the image cache", len(images), spec)
    else:
        started = time.monotonic()
        images, kept, shapes = _decode_fitted(cat, chosen, image_spec, spec.skip_corrupt)
        if cat.decoded:
            log.info("decoded %d images of %s in %.1fs", len(images), spec, time.monotonic() - started)
        if key:
            imagecache.store(key, images, kept, shapes)
    if not kept.all():
        skipped = [cat.ids[i] for i in chosen[~kept]]
        log.warning("%s: skipped %d undecodable images (first: %s)", spec, len(skipped),
                    ", ".join(skipped[:SKIP_NAMED]))
        chosen = chosen[kept]
        if chosen.size == 0:
            raise DataError(f"{spec}: every selected image in {cat.root} is undecodable")
    misfit = preprocess.FitTally(image_spec).add_all(shapes).message(f"images of {spec}")
    if misfit:
        log.info("%s", misfit)
    return LabeledImages(images, cat.labels[chosen], cat.class_names, tuple(cat.ids[i] for i in chosen), shapes)


def iter_images(
    spec: SourceSpec,
    data_root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> Iterator[tuple[str, np.ndarray, int | None]]:
    """(item id, native uint8 image HxW or HxWxC, label index or None), one at a time, unfitted.

    The source is listed (and a bad root or selection reported) when this is called; images are
    decoded one by one while iterating. idx and npz arrays are held in memory (they are read whole).
    """
    cat = catalog(spec, resolve_root(spec, data_root))
    chosen = _select(cat, spec, seed, test_fraction)

    def generate() -> Iterator[tuple[str, np.ndarray, int | None]]:
        for i in chosen:
            try:
                image = np.array(cat.read(i))  # a private, writable copy
            except DataError as exc:
                if not spec.skip_corrupt:
                    raise
                log.warning("skipping an undecodable image: %s", exc)
                continue
            label = int(cat.labels[i])
            yield cat.ids[i], image, (label if label >= 0 else None)

    return generate()


def load_images_from_folder(root: str | os.PathLike, skip_corrupt: bool = False) -> list[np.ndarray]:
    """Every image under a folder (recursively, PNG/JPEG/BMP, sorted by path) as native uint8 arrays,
    ready for Scorer.score_images; an undecodable file raises DataError unless skip_corrupt."""
    spec = SourceSpec(format="folder", root=str(root), skip_corrupt=skip_corrupt)
    return [image for _id, image, _label in iter_images(spec, None)]
