"""ama_stream.sources: specs, the four formats on real and on deliberately broken files, the cache."""
from __future__ import annotations

import gzip
import itertools
import logging
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from ama_stream import imagecache, sources
from ama_stream.preprocess import PreprocessSpec, fit_image
from ama_stream.sources import (
    DataError,
    SourceSpec,
    decode_image,
    has_builtin_split,
    is_kafka_source,
    iter_images,
    load_images,
    parse_source,
    resolve_data_root,
    resolve_root,
)

GRAY32 = PreprocessSpec(image_size=32, channels=1)
RGB32 = PreprocessSpec(image_size=32, channels=3)


def raw_idx(path: Path, header: int) -> np.ndarray:
    """An independent reader for the checks: gunzip and skip the header."""
    return np.frombuffer(gzip.decompress(path.read_bytes())[header:], dtype=np.uint8)


def write_idx(path: Path, magic: int, array: np.ndarray, compress: bool = False) -> Path:
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_idx_dir(root: Path, n: int = 6, compress: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", 2051, rng.integers(0, 256, (n, 5, 4)), compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, np.arange(n) % 3, compress)
    return root


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but carries almost no data: a decompression-bomb stand-in."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit gray
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize("text", ["folder:/data/line3/good", "idx:fashion-mnist", "npz:/data/x.npz", "elpv:elpv"])
def test_parse_source_round_trips(text):
    spec = parse_source(text)
    assert f"{spec.format}:{spec.root}" == text == str(spec)
    assert spec.classes is None and spec.split is None
    assert SourceSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert SourceSpec.model_validate(text) == spec  # the string form in YAML configs


def test_parse_source_normalizes_classes_per_format():
    assert parse_source("folder:/x", "good, scratch").classes == ("good", "scratch")
    assert parse_source("folder:/x", [0, 1]).classes == ("0", "1")
    assert parse_source("idx:mnist", "3,7,3").classes == (3, 7)
    assert parse_source("npz:/x.npz", [2, "5"]).classes == (2, 5)
    assert parse_source("elpv:elpv", ["0.333", 1]).classes == (0.333, 1.0)


@pytest.mark.parametrize("text, classes, expected", [
    ("kafka:frames", None, "cannot read kafka"),
    ("tiff:/data", None, "FORMAT:ROOT"),
    ("/data/line3/good", None, "FORMAT:ROOT"),
    ("idx:", None, "empty ROOT"),
    ("idx:mnist", "cat", "integer labels"),
    ("idx:mnist", [-1], "integer labels"),
    ("elpv:elpv", "broken", "defect probabilities"),
    ("elpv:elpv", [2], "in [0, 1]"),
])
def test_parse_source_errors(text, classes, expected):
    with pytest.raises(DataError, match="source") as err:
        parse_source(text, classes)
    assert expected in str(err.value)


def test_kafka_sources_are_recognised_for_the_callers():
    assert is_kafka_source("kafka:frames") and is_kafka_source(" KAFKA:t")
    assert not is_kafka_source("folder:/kafka:x")


@pytest.mark.parametrize("fields, expected", [
    ({"format": "folder", "root": "x", "colour": "red"}, "Extra inputs"),
    ({"format": "folder", "root": "x", "cell_type": "mono"}, "elpv sources only"),
    ({"format": "idx", "root": "x", "skip_corrupt": True}, "folder and elpv"),
    ({"format": "folder", "root": "x", "classes": []}, "must not be empty"),
    ({"format": "folder", "root": "x", "classes": [True]}, "name or a number"),
    ({"format": "folder", "root": "x", "split": "val"}, "split"),
    ({"format": "gif", "root": "x"}, "format"),
])
def test_source_spec_rejects_bad_fields(fields, expected):
    with pytest.raises(ValidationError, match=expected):
        SourceSpec(**fields)


def test_spec_is_frozen_and_hashable():
    spec = parse_source("idx:mnist", "1")
    with pytest.raises(ValidationError):
        spec.root = "other"
    assert {spec: 1}[parse_source("idx:mnist", [1])] == 1
    assert spec.with_split("test").split == "test" and spec.split is None


# --------------------------------------------------------------------------- roots


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("AMA_DATA_ROOT", str(tmp_path))
    assert resolve_data_root() == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_root(other) == other  # --data-root wins over the environment
    monkeypatch.setenv("AMA_DATA_ROOT", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="AMA_DATA_ROOT .*nope.* is not a directory"):
        resolve_data_root()
    monkeypatch.delenv("AMA_DATA_ROOT")
    shared = Path(sources.__file__).resolve().parent.parent.parent / "shared" / "datasets"
    assert resolve_data_root() == (shared if shared.is_dir() else Path.cwd())


def test_relative_root_not_found_names_the_data_root(tmp_path):
    with pytest.raises(DataError, match=r"idx source root not found: .*no-such-set .*data root"):
        resolve_root(parse_source("idx:no-such-set"), tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_images(parse_source(f"folder:{tmp_path}/absent"), None, GRAY32)


# --------------------------------------------------------------------------- idx


def test_fashion_mnist_idx_is_padded_28_to_32(full_data_root):
    spec = parse_source("idx:fashion-mnist").with_split("test")
    data = load_images(spec, full_data_root, GRAY32)
    raw_images = raw_idx(full_data_root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    raw_labels = raw_idx(full_data_root / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz", 8)
    assert data.images.shape == (10000, 32, 32, 1) and data.images.dtype == np.uint8
    assert data.class_names == tuple(str(k) for k in range(10))
    assert np.array_equal(data.labels, raw_labels) and data.labels.dtype == np.int64
    assert np.array_equal(data.images[:, 2:30, 2:30, 0], raw_images)  # centred...
    border = data.images.copy()
    border[:, 2:30, 2:30] = 0
    assert not border.any()  # ...in a zero frame
    assert data.ids[7].endswith("t10k-images-idx3-ubyte.gz#7")


def test_idx_splits_and_class_selection(data_root):
    train = load_images(parse_source("idx:mnist", "0,9").with_split("train"), data_root, GRAY32)
    raw_labels = raw_idx(data_root / "mnist" / "train-labels-idx1-ubyte.gz", 8)
    assert len(train) == int(np.isin(raw_labels, [0, 9]).sum())
    assert set(np.unique(train.labels)) == {0, 9}
    assert has_builtin_split(parse_source("idx:mnist"), data_root)


def test_iter_images_is_lazy_and_native(data_root):
    items = list(itertools.islice(iter_images(parse_source("idx:fashion-mnist", [9]).with_split("test"), data_root), 3))
    assert len(items) == 3
    for item_id, image, label in items:
        assert image.shape == (28, 28) and image.dtype == np.uint8 and image.flags.writeable
        assert label == 9 and "t10k-images" in item_id


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reads_plain_and_gzip(tmp_path, compress):
    root = make_idx_dir(tmp_path / "set", compress=compress)
    data = load_images(SourceSpec(format="idx", root=str(root)), None, GRAY32)
    assert data.images.shape == (12, 32, 32, 1)
    assert list(data.labels) == [0, 1, 2] * 4
    assert data.class_names == ("0", "1", "2")


def test_truncated_idx_names_the_file(tmp_path):
    root = make_idx_dir(tmp_path / "set")
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated: the header promises 6 images"):
        load_images(SourceSpec(format="idx", root=str(root), split="test"), None, GRAY32)
    path.write_bytes(path.read_bytes()[:9])
    with pytest.raises(DataError, match="truncated IDX header"):
        load_images(SourceSpec(format="idx", root=str(root), split="test"), None, GRAY32)


def test_truncated_gzip_idx_names_the_file(tmp_path):
    root = make_idx_dir(tmp_path / "set", compress=True)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot read or decompress"):
        load_images(SourceSpec(format="idx", root=str(root), split="train"), None, GRAY32)


def test_wrong_magic_idx(tmp_path):
    root = make_idx_dir(tmp_path / "set")
    write_idx(root / "train-labels-idx1-ubyte", 2051, np.zeros((6, 5, 4)))  # an image file where labels belong
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: wrong magic number 2051 .*label file starts with 2049"):
        load_images(SourceSpec(format="idx", root=str(root), split="train"), None, GRAY32)


def test_idx_label_count_mismatch_and_missing_file(tmp_path):
    root = make_idx_dir(tmp_path / "set")
    write_idx(root / "train-labels-idx1-ubyte", 2049, np.zeros(5))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 5 labels but train-images-idx3-ubyte holds 6 images"):
        load_images(SourceSpec(format="idx", root=str(root), split="train"), None, GRAY32)
    (root / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-images-idx3-ubyte \(or t10k-images-idx3-ubyte.gz\)"):
        load_images(SourceSpec(format="idx", root=str(root), split="test"), None, GRAY32)


def test_unknown_idx_class_lists_the_available_ones(tmp_path):
    root = make_idx_dir(tmp_path / "set")
    with pytest.raises(DataError, match=r"unknown class 7; available: 0, 1, 2"):
        load_images(SourceSpec(format="idx", root=str(root), classes=[7]), None, GRAY32)


# --------------------------------------------------------------------------- folder


def test_folder_tree_classes_labels_and_ids(tmp_image_tree):
    root = tmp_image_tree({"good": 3, "scratch/day1": 1, "scratch/day2": 1})
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "scratch" / "day2" / "x.jpg")
    (root / "good" / "notes.txt").write_text("not an image")
    data = load_images(SourceSpec(format="folder", root=str(root)), None, GRAY32)
    assert data.class_names == ("good", "scratch")
    assert list(data.labels) == [0, 0, 0, 1, 1, 1]  # subfolders of a class are searched too
    assert data.images.shape == (6, 32, 32, 1)
    assert data.ids[0] == str(root / "good" / "0000.png")
    only = load_images(SourceSpec(format="folder", root=str(root), classes=["scratch"]), None, GRAY32)
    assert len(only) == 3 and set(only.labels) == {1}


def test_lazy_and_bulk_reads_agree(tmp_image_tree):
    root = tmp_image_tree({"a": 2, "b": 2}, mode="RGBA", size=(40, 30))
    spec = parse_source(f"folder:{root}")
    bulk = load_images(spec, None, GRAY32)
    lazy = list(iter_images(spec))
    assert [item_id for item_id, _, _ in lazy] == list(bulk.ids)
    assert [label for _, _, label in lazy] == list(bulk.labels)
    assert all(image.shape == (40, 30, 3) for _, image, _ in lazy)  # native size, alpha dropped
    assert np.array_equal(np.stack([fit_image(image, GRAY32) for _, image, _ in lazy]), bulk.images)


def test_folder_without_subfolders_is_one_class(tmp_image_tree):
    root = tmp_image_tree({"": 4}, name="good")
    data = load_images(parse_source(f"folder:{root}"), None, RGB32)
    assert data.class_names == ("good",) and data.images.shape == (4, 32, 32, 3)
    assert not has_builtin_split(parse_source(f"folder:{root}"))


def test_folder_with_train_and_test_has_a_builtin_split(tmp_image_tree):
    root = tmp_image_tree({"train/good": 4, "test/good": 2, "test/dent": 3, "ground_truth/dent": 1})
    spec = parse_source(f"folder:{root}")
    assert has_builtin_split(spec)
    train = load_images(spec.with_split("train"), None, GRAY32)
    test = load_images(spec.with_split("test"), None, GRAY32)
    assert train.class_names == test.class_names == ("dent", "good")
    assert len(train) == 4 and all("/train/" in i for i in train.ids)
    assert len(test) == 5 and sorted(test.labels) == [0, 0, 0, 1, 1]
    assert len(load_images(spec, None, GRAY32)) == 9  # all: both halves, ground_truth ignored
    with pytest.raises(DataError, match="no images selected"):
        load_images(spec.with_split("train").with_classes(["dent"]), None, GRAY32)


def test_unknown_folder_class_lists_the_available_ones(tmp_image_tree):
    root = tmp_image_tree({"good": 1, "dent": 1})
    with pytest.raises(DataError, match=r"unknown class 'scratch'; available: dent, good"):
        load_images(parse_source(f"folder:{root}", "scratch"), None, GRAY32)


def test_empty_class_folder_is_an_error(tmp_image_tree):
    root = tmp_image_tree({"good": 2, "dent": 0})
    (root / "dent" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty class folder: .*dent holds no PNG/JPEG/BMP images"):
        load_images(parse_source(f"folder:{root}"), None, GRAY32)


def test_folder_without_images_and_loose_images_next_to_classes(tmp_image_tree):
    empty = tmp_image_tree({}, name="empty")
    with pytest.raises(DataError, match="no PNG/JPEG/BMP images and no class folders"):
        load_images(parse_source(f"folder:{empty}"), None, GRAY32)
    mixed = tmp_image_tree({"": 1, "good": 1}, name="mixed")
    with pytest.raises(DataError, match=r"class folders and also loose images \(e.g. 0000.png\)"):
        load_images(parse_source(f"folder:{mixed}"), None, GRAY32)


@pytest.mark.parametrize("ext, keep", [(".png", 40), (".jpg", 300)])
def test_corrupt_image_in_a_folder_names_the_file(tmp_image_tree, ext, keep):
    root = tmp_image_tree({"good": 3}, ext=ext, size=(64, 64), mode="RGB")
    bad = root / "good" / f"0001{ext}"
    bad.write_bytes(bad.read_bytes()[:keep])
    spec = parse_source(f"folder:{root}")
    with pytest.raises(DataError, match=rf"{bad}: corrupt or truncated image"):
        load_images(spec, None, GRAY32)
    with pytest.raises(DataError, match=rf"{bad}: corrupt or truncated image"):
        list(iter_images(spec))


def test_garbage_bytes_with_an_image_name(tmp_image_tree):
    root = tmp_image_tree({"good": 1})
    (root / "good" / "zz.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"zz.jpg: corrupt or truncated image \(cannot identify"):
        load_images(parse_source(f"folder:{root}"), None, GRAY32)


def test_skip_corrupt_logs_and_skips(tmp_image_tree, caplog):
    root = tmp_image_tree({"good": 3, "dent": 1})
    bad = root / "good" / "0001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    spec = SourceSpec(format="folder", root=str(root), skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="ama_stream.sources"):
        data = load_images(spec, None, GRAY32)
    assert len(data) == 3 and str(bad) not in data.ids and list(data.labels) == [0, 1, 1]
    assert str(bad) in caplog.text and "skipped 1 undecodable" in caplog.text
    assert [item_id for item_id, _, _ in iter_images(spec)] == list(data.ids)


def test_modes_come_out_as_uint8_gray_or_rgb(tmp_path):
    gray16 = np.array([[0, 257, 65535], [32896, 1000, 65534]], dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = decode_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.tolist() == [[0, 1, 255], [128, 4, 255]]

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, colour kept
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert decode_image(tmp_path / "rgba.png").tolist() == [[[200, 0, 0]] * 2] * 2

    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    assert decode_image(tmp_path / "p.png").tolist() == [[[0, 0, 0], [10, 20, 30], [0, 0, 0]]]

    Image.new("LA", (2, 2), (77, 5)).save(tmp_path / "la.png")
    assert decode_image(tmp_path / "la.png").tolist() == [[77, 77], [77, 77]]

    Image.new("1", (2, 1), 1).save(tmp_path / "bw.bmp")
    assert decode_image(tmp_path / "bw.bmp").tolist() == [[255, 255]]


@pytest.mark.parametrize("side", [10_000, 30_000])  # over PIL's limit (a warning there) and over twice it (an error)
def test_decompression_bombs_are_data_errors(tmp_path, side):
    assert Image.MAX_IMAGE_PIXELS is not None  # nothing here switched PIL's guard off
    path = tmp_path / "good" / "bomb.png"
    path.parent.mkdir()
    path.write_bytes(png_header_only(side, side))
    with pytest.raises(DataError, match=r"bomb.png: image too large to decode safely"):
        load_images(parse_source(f"folder:{path.parent}"), None, GRAY32)


# --------------------------------------------------------------------------- elpv


def elpv_rows(data_root: Path) -> list[tuple[str, float, str]]:
    rows = [line.split() for line in (data_root / "elpv" / "labels.csv").read_text().splitlines() if line.strip()]
    return [(path, float(prob), kind) for path, prob, kind in rows]


def test_elpv_label_mapping(full_data_root):
    rows = elpv_rows(full_data_root)
    spec = SourceSpec(format="elpv", root="elpv", classes=[0.667], cell_type="poly")
    data = load_images(spec, full_data_root, GRAY32)
    expected = [str(full_data_root / "elpv" / p) for p, prob, kind in rows if abs(prob - 2 / 3) < 1e-3 and kind == "poly"]
    assert list(data.ids) == expected and len(expected) == 50
    assert data.class_names == ("0.0", "0.333", "0.667", "1.0")
    assert set(data.labels) == {2}
    assert data.images.shape == (50, 32, 32, 1)  # 300x300 cells resized
    item_id, image, label = next(iter_images(spec, full_data_root))
    assert (item_id, image.shape, label) == (expected[0], (300, 300), 2)


def test_elpv_split_is_seeded_and_stable(full_data_root):
    spec = SourceSpec(format="elpv", root="elpv", classes=["1.0"], cell_type="mono")
    n_mono_defect = sum(1 for _, prob, kind in elpv_rows(full_data_root) if prob == 1.0 and kind == "mono")
    ids = {split: [i for i, _, _ in iter_images(spec.with_split(split), full_data_root, seed=3)]
           for split in ("train", "test")}
    assert not set(ids["train"]) & set(ids["test"])
    assert len(ids["train"]) + len(ids["test"]) == n_mono_defect
    assert 0.12 < len(ids["test"]) / n_mono_defect < 0.28
    # the split of a cell depends on the seed and its path only, not on the other classes selected
    wide = [i for i, _, _ in iter_images(spec.with_classes([0.667, 1]).with_split("test"), full_data_root, seed=3)]
    assert set(ids["test"]) <= set(wide)
    other_seed = [i for i, _, _ in iter_images(spec.with_split("test"), full_data_root, seed=4)]
    assert other_seed != ids["test"]


def test_elpv_errors(tmp_path, tmp_image_tree):
    with pytest.raises(DataError, match=r"elpv source .*cells: missing labels.csv"):
        load_images(SourceSpec(format="elpv", root=str(tmp_image_tree({}, name="cells"))), None, GRAY32)
    root = tmp_image_tree({"images": 2}, name="elpv")
    (root / "labels.csv").write_text("images/0000.png  1.0  mono\nimages/0001.png  high  poly\n")
    with pytest.raises(DataError, match=r"labels.csv:2: defect probability 'high' is not a number"):
        load_images(SourceSpec(format="elpv", root=str(root)), None, GRAY32)
    (root / "labels.csv").write_text("images/0000.png  1.0  mono\nimages/0001.png  0.0\n")
    with pytest.raises(DataError, match=r"labels.csv:2: expected 'PATH PROBABILITY TYPE'"):
        load_images(SourceSpec(format="elpv", root=str(root)), None, GRAY32)
    (root / "labels.csv").write_text("images/0000.png  1.0  mono\nimages/0001.png  0.0  poly\nimages/gone.png 0 mono\n")
    with pytest.raises(DataError, match=r"unknown class 0.5; available: 0.0, 1.0"):
        load_images(SourceSpec(format="elpv", root=str(root), classes=[0.5]), None, GRAY32)
    with pytest.raises(DataError, match=r"gone.png: image file not found"):
        load_images(SourceSpec(format="elpv", root=str(root), classes=[0]), None, GRAY32)


# --------------------------------------------------------------------------- npz


def test_npz_with_and_without_labels(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images, labels=np.arange(40) % 4)
    data = load_images(parse_source(f"npz:{tmp_path / 'x.npz'}", "1,3"), None, GRAY32)
    assert len(data) == 20 and set(data.labels) == {1, 3} and data.class_names == ("0", "1", "2", "3")
    assert data.ids[0] == f"{tmp_path / 'x.npz'}#1"
    item_id, image, label = next(iter_images(parse_source(f"npz:{tmp_path / 'x.npz'}")))
    assert np.array_equal(image, images[0]) and label == 0

    np.savez(tmp_path / "u.npz", images=images[:, :, :, 0])
    unlabeled = parse_source(f"npz:{tmp_path / 'u.npz'}")
    data = load_images(unlabeled, None, GRAY32)
    assert len(data) == 40 and set(data.labels) == {-1} and data.class_names == ()
    assert next(iter_images(unlabeled))[2] is None
    with pytest.raises(DataError, match="has no labels"):
        load_images(parse_source(f"npz:{tmp_path / 'u.npz'}", "1"), None, GRAY32)


def test_seeded_split_of_an_npz(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((1000, 4, 4), np.uint8), labels=np.arange(1000) % 2)
    spec = parse_source(f"npz:{tmp_path / 'x.npz'}")
    test = load_images(spec.with_split("test"), None, GRAY32, seed=5, test_fraction=0.3)
    train = load_images(spec.with_split("train"), None, GRAY32, seed=5, test_fraction=0.3)
    assert sorted(test.ids + train.ids, key=lambda i: int(i.split("#")[1])) == [f"{tmp_path / 'x.npz'}#{k}" for k in range(1000)]
    assert 250 < len(test) < 350
    assert load_images(spec.with_split("test"), None, GRAY32, seed=5, test_fraction=0.3).ids == test.ids
    assert load_images(spec.with_split("test"), None, GRAY32, seed=6, test_fraction=0.3).ids != test.ids
    class1 = load_images(spec.with_split("test").with_classes([1]), None, GRAY32, seed=5, test_fraction=0.3)
    assert set(class1.ids) == {i for i, label in zip(test.ids, test.labels) if label == 1}


@pytest.mark.parametrize("arrays, expected", [
    ({"images": np.array([{"a": 1}], dtype=object)}, "cannot read npz .*allow_pickle"),
    ({"images": np.zeros((3, 4, 4), np.float32)}, "'images' must be uint8 .*found float32"),
    ({"images": np.zeros((3, 4, 4, 2), np.uint8)}, r"N,H,W or N,H,W,C with C in 1, 3, 4; found \(3, 4, 4, 2\)"),
    ({"images": np.zeros((3, 4), np.uint8)}, "N,H,W or N,H,W,C"),
    ({"images": np.zeros((0, 4, 4), np.uint8)}, "holds no images"),
    ({"pixels": np.zeros((3, 4, 4), np.uint8)}, r"no 'images' array \(arrays found: pixels\)"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(2, np.int64)}, r"integers of shape \(3,\)"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(3, np.float32)}, "integers"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": -np.ones(3, np.int64)}, "non-negative"),
])
def test_bad_npz_contents(tmp_path, arrays, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=rf"^{path}: ") as err:
        load_images(parse_source(f"npz:{path}"), None, GRAY32)
    assert re.search(expected, str(err.value))


def test_unreadable_npz_files(tmp_path):
    truncated = tmp_path / "cut.npz"
    np.savez(truncated, images=np.zeros((50, 8, 8), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DataError, match=rf"{truncated}: cannot read npz"):
        load_images(parse_source(f"npz:{truncated}"), None, GRAY32)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=rf"{plain}: not an .npz archive"):
        load_images(parse_source(f"npz:{plain}"), None, GRAY32)
    with pytest.raises(DataError, match="must be a .npz file"):
        load_images(parse_source(f"npz:{tmp_path}"), None, GRAY32)


# --------------------------------------------------------------------------- cifar and the cache


def test_cifar_gray_conversion_matches_rgb(full_data_root):
    spec = parse_source("folder:cifar10-jpeg", ["cat"]).with_split("test")
    rgb = load_images(spec, full_data_root, RGB32)
    gray = load_images(spec, full_data_root, GRAY32)
    assert rgb.images.shape == (1000, 32, 32, 3) and gray.images.shape == (1000, 32, 32, 1)
    assert rgb.ids == gray.ids and all("/test/cat/" in i for i in rgb.ids)
    assert len(rgb.class_names) == 10 and set(rgb.labels) == {rgb.class_names.index("cat")}
    luma = np.rint(rgb.images.astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(luma - gray.images[..., 0]).max() <= 1  # ITU-R 601 luma, float32 rounding aside
    assert rgb.images.std() > 20  # real pictures, not blank decodes


def test_image_cache_round_trip_corruption_and_invalidation(tmp_image_tree, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AMA_CACHE_DIR", str(cache))
    monkeypatch.setattr(sources, "CACHE_MIN_IMAGES", 1)
    root = tmp_image_tree({"good": 5, "dent": 2}, mode="RGB")
    spec = parse_source(f"folder:{root}")
    first = load_images(spec, None, GRAY32)
    entries = list(cache.glob("*.npz"))
    assert len(entries) == 1
    with caplog.at_level(logging.INFO, logger="ama_stream.sources"):
        second = load_images(spec, None, GRAY32)
    assert "from the image cache" in caplog.text
    assert np.array_equal(first.images, second.images) and first.ids == second.ids

    entries[0].write_bytes(entries[0].read_bytes()[:100])  # a torn entry
    with caplog.at_level(logging.WARNING, logger="ama_stream.imagecache"):
        third = load_images(spec, None, GRAY32)
    assert "ignoring unreadable image cache entry" in caplog.text
    assert np.array_equal(first.images, third.images)
    assert imagecache.load(entries[0].stem, len(first), (32, 32, 1)) is not None  # rebuilt

    Image.fromarray(np.full((12, 10, 3), 255, np.uint8)).save(root / "good" / "0000.png")
    changed = load_images(spec, None, GRAY32)
    assert (changed.images[2] == 255).all() and not np.array_equal(changed.images, first.images)
    assert len(list(cache.glob("*.npz"))) == 2

    monkeypatch.setenv("AMA_CACHE_DIR", "off")
    assert imagecache.cache_dir() is None
    assert np.array_equal(load_images(spec, None, GRAY32).images, changed.images)
