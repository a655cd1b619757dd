"""Per-format catalogues: every item of a source listed without decoding, with its labels, class
names, built-in split and a reader for one item.

  idx     `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, gzipped or plain; read whole, checked.
  folder  class subfolders (recursively) or one class; a root with train/ and test/ has its split.
  elpv    `labels.csv` rows `PATH PROBABILITY TYPE`; classes are the rounded defect probabilities.
  npz     `images` uint8 N,H,W[,C] and optional integer `labels`, loaded without pickles.

Bad data raises DataError naming the file and the problem.
"""
from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.npyio import NpzFile

from .images import DataError, decode_image
from .source_spec import SourceSpec

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class Catalog:
    """Every item of a source, listed without decoding."""

    root: Path
    ids: tuple[str, ...]  # file paths, or FILE#INDEX
    keys: tuple[str, ...]  # root-relative names, hashed for the seeded split
    labels: np.ndarray  # int64, -1 when unlabeled
    class_names: tuple[str, ...]
    class_values: tuple[str | int | float, ...]  # what a normalized SourceSpec.classes entry compares to
    is_test: np.ndarray | None  # the built-in split; None when the source has none
    read: Callable[[int], np.ndarray]  # item index -> native uint8 image
    decoded: bool  # True when read() decodes a file (so it may fail on a corrupt one)


def _read_bytes_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read or decompress ({exc})") from None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    raw = _read_bytes_maybe_gzip(path)
    kind = "image" if magic == IDX_IMAGES_MAGIC else "label"
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: wrong magic number {found} (an IDX {kind} file starts with {magic})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if any(d == 0 for d in dims[1:]):
        raise DataError(f"{path}: IDX dimensions {dims} contain a zero")
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - header
    if have < expected:
        raise DataError(f"{path}: truncated: the header promises {dims[0]} {kind}s ({expected} bytes of data) "
                        f"but only {have} bytes follow")
    if have > expected:
        raise DataError(f"{path}: {have - expected} unexpected bytes after the {dims[0]} {kind}s (corrupt IDX file)")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _idx_file(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"idx source {root}: missing {name} (or {name}.gz)")


def _int_class_names(labels: np.ndarray) -> tuple[str, ...]:
    return tuple(str(k) for k in range(int(labels.max()) + 1 if labels.size else 0))


def _idx_catalog(root: Path, spec: SourceSpec) -> Catalog:
    if not root.is_dir():
        raise DataError(f"idx source root must be a directory holding the IDX files: {root}")
    parts = ["train", "test"] if spec.split in (None, "all") else [spec.split]
    pixels, labels, ids, keys, is_test = [], [], [], [], []
    for part in parts:
        images_path, labels_path = (_idx_file(root, name) for name in IDX_FILES[part])
        images = _read_idx(images_path, IDX_IMAGES_MAGIC)
        part_labels = _read_idx(labels_path, IDX_LABELS_MAGIC)
        if images.ndim != 3:
            raise DataError(f"{images_path}: expected 3 dimensions (count, rows, cols), found {images.ndim}")
        if part_labels.ndim != 1 or len(part_labels) != len(images):
            raise DataError(f"{labels_path}: {len(part_labels)} labels but {images_path.name} holds {len(images)} images")
        pixels.append(images)
        labels.append(part_labels.astype(np.int64))
        ids.extend(f"{images_path}#{i}" for i in range(len(images)))
        keys.extend(f"{images_path.name}#{i}" for i in range(len(images)))
        is_test.append(np.full(len(images), part == "test"))
    all_pixels = pixels[0] if len(pixels) == 1 else np.concatenate(pixels)
    all_labels = np.concatenate(labels)
    names = _int_class_names(all_labels)
    return Catalog(root, tuple(ids), tuple(keys), all_labels, names, tuple(range(len(names))),
                    np.concatenate(is_test), lambda i: all_pixels[i], decoded=False)


def _npz_catalog(root: Path) -> Catalog:
    if not root.is_file():
        raise DataError(f"npz source root must be a .npz file: {root}")
    try:
        archive = np.load(root, allow_pickle=False)
        if not isinstance(archive, NpzFile):  # a plain .npy array
            raise DataError(f"{root}: not an .npz archive")
        with archive:
            if "images" not in archive.files:
                raise DataError(f"{root}: no 'images' array (arrays found: {', '.join(archive.files) or 'none'})")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # numpy refuses object/pickled arrays here with a ValueError naming allow_pickle
        raise DataError(f"{root}: cannot read npz ({exc})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{root}: 'images' must be uint8 (0..255), found {images.dtype}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3, 4))) or 0 in images.shape[1:]:
        raise DataError(f"{root}: 'images' must have shape N,H,W or N,H,W,C with C in 1, 3, 4; found {images.shape}")
    if len(images) == 0:
        raise DataError(f"{root}: 'images' holds no images")
    if labels is None:
        labels = np.full(len(images), -1, dtype=np.int64)
        names: tuple[str, ...] = ()
    else:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(images):
            raise DataError(f"{root}: 'labels' must be integers of shape ({len(images)},), found {labels.dtype} {labels.shape}")
        if labels.min() < 0:
            raise DataError(f"{root}: 'labels' must be non-negative, found {labels.min()}")
        labels = labels.astype(np.int64)
        names = _int_class_names(labels)
    ids = tuple(f"{root}#{i}" for i in range(len(images)))
    keys = tuple(str(i) for i in range(len(images)))
    return Catalog(root, ids, keys, labels, names, tuple(range(len(names))), None,
                    lambda i: images[i], decoded=False)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_files(directory: str) -> list[str]:
    """PNG/JPEG/BMP files under `directory` (recursively, hidden entries skipped), sorted.

    Plain strings, not Paths: listing CIFAR-10's 60000 files with pathlib costs seconds.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image_name(f))
    return sorted(found)


def _class_folders(base: str, single_class_name: str) -> list[tuple[str, list[str]]]:
    """[(class name, files)] of one folder laid out as class subfolders or as one class."""
    with os.scandir(base) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    subdirs = [e.path for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.path for e in entries if e.is_file() and _is_image_name(e.name)]
    if not subdirs:
        if not loose:
            raise DataError(f"{base}: no PNG/JPEG/BMP images and no class folders")
        return [(single_class_name, loose)]
    if loose:
        raise DataError(f"{base} holds class folders and also loose images (e.g. {os.path.basename(loose[0])}); "
                        "move the images into a class folder")
    out = []
    for sub in subdirs:
        files = _image_files(sub)
        if not files:
            raise DataError(f"empty class folder: {sub} holds no PNG/JPEG/BMP images")
        out.append((os.path.basename(sub), files))
    return out


def _folder_catalog(root: Path) -> Catalog:
    if not root.is_dir():
        raise DataError(f"folder source root is not a directory: {root}")
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    halves = [(False, root / "train"), (True, root / "test")] if has_split else [(False, root)]
    listed = [(is_test, name, files) for is_test, base in halves for name, files in _class_folders(str(base), root.name)]
    names = tuple(sorted({name for _, name, _ in listed}))
    index = {name: k for k, name in enumerate(names)}
    files: list[str] = []
    labels: list[int] = []
    is_test: list[bool] = []
    for test_half, name, class_files in listed:
        files.extend(class_files)
        labels.extend([index[name]] * len(class_files))
        is_test.extend([test_half] * len(class_files))
    prefix = len(str(root)) + 1
    keys = tuple(f[prefix:].replace(os.sep, "/") for f in files)
    return Catalog(root, tuple(files), keys, np.asarray(labels, dtype=np.int64), names, names,
                    np.asarray(is_test) if has_split else None, lambda i: decode_image(files[i]), decoded=True)


def _elpv_catalog(root: Path, spec: SourceSpec) -> Catalog:
    csv = root / "labels.csv"
    if not csv.is_file():
        raise DataError(f"elpv source {root}: missing labels.csv")
    try:
        lines = csv.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv}: cannot read ({exc})") from None
    rows: list[tuple[str, float]] = []
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise DataError(f"{csv}:{lineno}: expected 'PATH PROBABILITY TYPE', found {line.strip()!r}")
        path, prob_text, cell_type = fields
        try:
            prob = float(prob_text)
        except ValueError:
            prob = float("nan")
        if not 0.0 <= prob <= 1.0:
            raise DataError(f"{csv}:{lineno}: defect probability {prob_text!r} is not a number in [0, 1]")
        if cell_type.lower() not in ("mono", "poly"):
            raise DataError(f"{csv}:{lineno}: cell type {cell_type!r} is neither mono nor poly")
        if spec.cell_type is None or cell_type.lower() == spec.cell_type:
            rows.append((path, round(prob, 3)))
    if not rows:
        raise DataError(f"{csv} lists no images" + (f" of cell type {spec.cell_type}" if spec.cell_type else ""))
    values = tuple(sorted({p for _, p in rows}))
    index = {v: k for k, v in enumerate(values)}
    files = [root / path for path, _ in rows]
    labels = np.asarray([index[p] for _, p in rows], dtype=np.int64)
    return Catalog(root, tuple(str(f) for f in files), tuple(path for path, _ in rows), labels,
                    tuple(repr(v) for v in values), values, None, lambda i: decode_image(files[i]), decoded=True)


def catalog(spec: SourceSpec, root: Path) -> Catalog:
    """The source's items, listed (and the listing checked) without decoding any image."""
    if spec.format == "idx":
        return _idx_catalog(root, spec)
    if spec.format == "npz":
        return _npz_catalog(root)
    if spec.format == "elpv":
        return _elpv_catalog(root, spec)
    return _folder_catalog(root)
