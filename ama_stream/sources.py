"""Image data sources (`FORMAT:ROOT`): parsing, and reading lazily (runtime) or in bulk (training).

Formats (DESIGN.md section 5):

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
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
from numpy.lib.npyio import NpzFile
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from . import imagecache, preprocess
from .images import DataError, decode_image, pil_to_uint8  # noqa: F401 -- part of this module's API
from .progress import progress
from .preprocess import PreprocessSpec, fit_image

log = logging.getLogger(__name__)

FORMATS = ("idx", "folder", "elpv", "npz")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
DEFAULT_TEST_FRACTION = 0.2
DATA_ROOT_ENV = "AMA_DATA_ROOT"
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CACHE_MIN_IMAGES = 256  # smaller selections decode about as fast as the cache bookkeeping
ELPV_TOLERANCE = 0.01  # 0.333 in a config matches 0.3333333333333333 in labels.csv


# --------------------------------------------------------------------------- the source spec


def _normalize_class(fmt: str | None, item: str | int | float) -> str | int | float:
    """One class selector in the form the format compares against (raises ValueError)."""
    if fmt in ("idx", "npz"):
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item.strip())
        if not isinstance(item, int) or item < 0:
            raise ValueError(f"{fmt} classes are non-negative integer labels, got {item!r}")
        return item
    if fmt == "elpv":
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"elpv classes are defect probabilities such as 0, 0.333, 0.667, 1.0; got {item!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"elpv classes are defect probabilities in [0, 1], got {item!r}")
        return value
    name = str(item)
    if fmt == "folder" and not name.strip():
        raise ValueError("folder class names must not be empty")
    return name


class SourceSpec(BaseModel):
    """Where images come from; `data.normal` / `data.anomaly` in configs, `FORMAT:ROOT` on the command line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["idx", "folder", "elpv", "npz"]  # idx (MNIST family), folder (one subfolder per class, or one folder = one class), elpv, npz
    root: str  # a relative root resolves against the data root
    classes: tuple[str | int | float, ...] | None = None  # None: every class
    split: Literal["train", "test", "all"] | None = None  # None: all, unless a protocol chooses
    cell_type: Literal["mono", "poly"] | None = None  # elpv only
    skip_corrupt: bool = False  # folder/elpv: log and skip undecodable images instead of failing

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data):
        # `normal: "idx:fashion-mnist"` in YAML or `--set data.anomaly=folder:/x` means FORMAT:ROOT
        if isinstance(data, str):
            fmt, root = _split_source_text(data)
            return {"format": fmt, "root": root}
        return data

    @field_validator("classes", mode="before")
    @classmethod
    def _normalize_classes(cls, value, info: ValidationInfo):
        if value is None:
            return None
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list of class names or labels")
        if not value:
            raise ValueError("must not be empty (leave it out to take every class)")
        out: list[str | int | float] = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueError(f"class {item!r} must be a name or a number")
            norm = _normalize_class(info.data.get("format"), item)
            if norm not in out:
                out.append(norm)
        return tuple(out)

    @model_validator(mode="after")
    def _check_format_options(self):
        if self.cell_type is not None and self.format != "elpv":
            raise ValueError(f"cell_type applies to elpv sources only, not {self.format}")
        if self.skip_corrupt and self.format not in ("folder", "elpv"):
            raise ValueError(f"skip_corrupt applies to folder and elpv sources only, not {self.format}")
        return self

    def with_split(self, split: Literal["train", "test", "all"] | None) -> "SourceSpec":
        return SourceSpec(**{**self.model_dump(), "split": split})

    def with_classes(self, classes: Sequence[str | int | float] | None) -> "SourceSpec":
        return SourceSpec(**{**self.model_dump(), "classes": classes})

    def __str__(self) -> str:
        text = f"{self.format}:{self.root}"
        if self.classes is not None:
            text += " classes=" + ",".join(str(c) for c in self.classes)
        if self.split is not None:
            text += f" split={self.split}"
        if self.cell_type is not None:
            text += f" cell_type={self.cell_type}"
        return text


def is_kafka_source(text: str) -> bool:
    """True for `kafka:TOPIC`, which only commands reading Kafka handle (before calling parse_source)."""
    return text.strip().lower().startswith("kafka:")


def _split_source_text(text: str) -> tuple[str, str]:
    if is_kafka_source(text):
        raise DataError(f"source {text!r}: this command cannot read kafka sources; "
                        f"give one of {', '.join(f + ':ROOT' for f in FORMATS)}")
    fmt, sep, root = text.strip().partition(":")
    fmt = fmt.strip().lower()
    if not sep or fmt not in FORMATS:
        raise DataError(f"source {text!r} must be FORMAT:ROOT with FORMAT one of {', '.join(FORMATS)} "
                        "(e.g. folder:/data/line3/good, idx:fashion-mnist)")
    if not root.strip():
        raise DataError(f"source {text!r} has an empty ROOT")
    return fmt, root.strip()


def parse_source(text: str, classes: str | Sequence[str | int | float] | None = None,
                 skip_corrupt: bool = False) -> SourceSpec:
    """`FORMAT:ROOT` (+ a class selection, a list or "a,b"; "" or None: every class) -> SourceSpec;
    DataError when malformed."""
    fmt, root = _split_source_text(text)
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()] or None
    try:
        return SourceSpec(format=fmt, root=root, classes=classes, skip_corrupt=skip_corrupt)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'source'}: {e['msg']}" for e in exc.errors())
        raise DataError(f"source {text!r}: {reasons}") from None


# --------------------------------------------------------------------------- roots


def resolve_data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The folder relative source roots resolve against.

    `explicit` (--data-root) if given, else $AMA_DATA_ROOT, else ../shared/datasets next to the
    repository (the folder above the ama_stream package) when it exists, else the current directory.
    """
    for value, what in ((explicit, "data root"), (os.environ.get(DATA_ROOT_ENV) or None, DATA_ROOT_ENV)):
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise DataError(f"{what} {str(value)!r} is not a directory")
            return path
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
    return shared if shared.is_dir() else Path.cwd()


def resolve_root(spec: SourceSpec, data_root: str | os.PathLike | None = None) -> Path:
    """The source's root as an absolute path; DataError when it does not exist."""
    root = Path(spec.root).expanduser()
    hint = ""
    if not root.is_absolute():
        base = resolve_data_root(data_root)
        root = base / root
        hint = f" (relative roots resolve against the data root {base}; set --data-root or {DATA_ROOT_ENV})"
    if not root.exists():
        raise DataError(f"{spec.format} source root not found: {root}{hint}")
    return root.absolute()


# --------------------------------------------------------------------------- decoding


# --------------------------------------------------------------------------- catalogs


@dataclass(frozen=True)
class _Catalog:
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


def _idx_catalog(root: Path, spec: SourceSpec) -> _Catalog:
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
    return _Catalog(root, tuple(ids), tuple(keys), all_labels, names, tuple(range(len(names))),
                    np.concatenate(is_test), lambda i: all_pixels[i], decoded=False)


def _npz_catalog(root: Path) -> _Catalog:
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
    return _Catalog(root, ids, keys, labels, names, tuple(range(len(names))), None,
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


def _folder_catalog(root: Path) -> _Catalog:
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
    return _Catalog(root, tuple(files), keys, np.asarray(labels, dtype=np.int64), names, names,
                    np.asarray(is_test) if has_split else None, lambda i: decode_image(files[i]), decoded=True)


def _elpv_catalog(root: Path, spec: SourceSpec) -> _Catalog:
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
    return _Catalog(root, tuple(str(f) for f in files), tuple(path for path, _ in rows), labels,
                    tuple(repr(v) for v in values), values, None, lambda i: decode_image(files[i]), decoded=True)


def _catalog(spec: SourceSpec, root: Path) -> _Catalog:
    if spec.format == "idx":
        return _idx_catalog(root, spec)
    if spec.format == "npz":
        return _npz_catalog(root)
    if spec.format == "elpv":
        return _elpv_catalog(root, spec)
    return _folder_catalog(root)


# --------------------------------------------------------------------------- selection


def _hash_is_test(keys: Sequence[str], seed: int, test_fraction: float) -> np.ndarray:
    """Per-item seeded split: test iff hash(seed, key) falls below test_fraction."""
    cut = int(test_fraction * 2**64)
    prefix = f"{seed}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "big") < cut for k in keys),
        dtype=bool, count=len(keys),
    )


def _class_labels(cat: _Catalog, spec: SourceSpec) -> list[int]:
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


def _select(cat: _Catalog, spec: SourceSpec, seed: int, test_fraction: float) -> np.ndarray:
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
    cat = _catalog(spec, resolve_root(spec, data_root))
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
    return _catalog(spec, resolve_root(spec, data_root)).class_names


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LabeledImages:
    images: np.ndarray  # uint8 [N, S, S, C], fitted to the model size
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
    for module_file in (__file__, preprocess.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()


SKIP_NAMED = 5  # undecodable files named one by one before only the count goes on


def _decode_fitted(cat: _Catalog, chosen: np.ndarray, image_spec: PreprocessSpec,
                   skip_corrupt: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fitted images of the decodable items, mask of those items over `chosen`, their native shapes)."""
    s, c = image_spec.image_size, image_spec.channels
    images = np.empty((len(chosen), s, s, c), dtype=np.uint8)
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
    cat = _catalog(spec, resolve_root(spec, data_root))
    chosen = _select(cat, spec, seed, test_fraction)
    key = None
    if cat.decoded and len(chosen) >= CACHE_MIN_IMAGES and imagecache.cache_dir() is not None:
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
    cat = _catalog(spec, resolve_root(spec, data_root))
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
