"""training.datasets: the cross / one-class / industrial protocols on the real data and on small trees."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ama_stream.preprocess import PreprocessSpec
from ama_stream.sources import DataError, parse_source
from training.datasets import DataConfig, build_protocol, build_test_set, resolve_image_shape


def raw_labels(path: Path) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes())[8:], dtype=np.uint8)


def index_of(item_id: str) -> int:
    return int(item_id.rsplit("#", 1)[1])


def assert_same(a, b) -> None:
    assert np.array_equal(a.train, b.train) and a.train_ids == b.train_ids
    for x, y in ((a.val, b.val), (a.test, b.test)):
        assert np.array_equal(x.images, y.images) and np.array_equal(x.labels, y.labels) and x.ids == y.ids


FMNIST_VS_MNIST = {"protocol": "cross", "normal": {"format": "idx", "root": "fashion-mnist"},
                   "anomaly": {"format": "idx", "root": "mnist"}}


# --------------------------------------------------------------------------- config


def test_data_config_from_yaml_like_data():
    cfg = DataConfig(**{**FMNIST_VS_MNIST, "anomaly": "idx:mnist", "image_size": 64, "channels": 3, "resize": "pad"})
    assert cfg.anomaly == parse_source("idx:mnist")
    assert cfg.preprocess_spec() == PreprocessSpec(image_size=64, channels=3, resize="pad")
    assert DataConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # what a checkpoint stores round-trips


@pytest.mark.parametrize("fields, expected", [
    ({"anomaly": None}, "cross protocol needs data.anomaly"),
    ({"protocol": "one-class", "anomaly": None}, "needs data.normal.classes"),
    ({"protocol": "one-class", "normal": "idx:mnist"}, "needs data.normal.classes"),
    ({"protocol": "one-class", "normal": {"format": "idx", "root": "mnist", "classes": [1]}}, "remove data.anomaly"),
    ({"normal": {"format": "idx", "root": "mnist", "split": "test"}}, "data.normal.split: the protocol chooses"),
    ({"val_anomalies": 50, "val_fraction": 0}, "set val_fraction > 0"),
    ({"anomaly_fraction": 0}, "anomaly_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"limit_train": 0}, "limit_train"),
    ({"channels": 2}, "channels"),
    ({"protocol": "few-shot"}, "protocol"),
    ({"shuffle": True}, "Extra inputs"),
    ({"anomaly": "kafka:frames"}, "cannot read kafka"),
])
def test_data_config_errors(fields, expected):
    with pytest.raises(ValidationError, match=expected):
        DataConfig(**{**FMNIST_VS_MNIST, **fields})


# --------------------------------------------------------------------------- cross


def test_cross_fashion_mnist_vs_mnist(full_data_root):
    cfg = DataConfig(**FMNIST_VS_MNIST)
    data = build_protocol(cfg, full_data_root, seed=0)
    # all of Fashion-MNIST's training split is trained on: no validation without val_anomalies
    assert data.train.shape == (60000, 32, 32, 1) and data.train.dtype == np.uint8
    assert all("fashion-mnist/train-images" in i for i in data.train_ids) and len(set(data.train_ids)) == 60000
    assert len(data.val.labels) == 0 and data.val.images.shape == (0, 32, 32, 1)
    test = data.test
    assert (test.n_normal, test.n_anomaly) == (10000, 2000)  # 20% of the normal test count
    assert test.images.shape == (12000, 32, 32, 1)
    assert all("fashion-mnist/t10k" in i for i, y in zip(test.ids, test.labels) if y == 0)
    anomaly_ids = [i for i, y in zip(test.ids, test.labels) if y == 1]
    assert all("/mnist/t10k-images" in i for i in anomaly_ids) and len(set(anomaly_ids)) == 2000
    # the sampled digits are spread over all classes, not the first 2000 of the file
    digits = raw_labels(full_data_root / "mnist" / "t10k-labels-idx1-ubyte.gz")[[index_of(i) for i in anomaly_ids]]
    assert set(digits) == set(range(10)) and max(index_of(i) for i in anomaly_ids) > 9000

    again = build_protocol(cfg, full_data_root, seed=0)
    assert_same(data, again)
    other = build_test_set(cfg, full_data_root, seed=1)
    assert other.ids[:10000] == test.ids[:10000] and other.ids[10000:] != test.ids[10000:]


def test_cross_limits_and_validation_anomalies(full_data_root):
    cfg = DataConfig(**FMNIST_VS_MNIST, anomaly_fraction=0.1, limit_train=1000, limit_test=550,
                     val_fraction=0.1, val_anomalies=30)
    data = build_protocol(cfg, full_data_root, seed=7)
    assert len(data.train) == 1000 and len(data.train_ids) == 1000
    assert (data.test.n_normal, data.test.n_anomaly) == (500, 50)  # the 10:1 ratio is kept under the cap
    assert (data.val.n_normal, data.val.n_anomaly) == (550, 30)  # normal val images capped, every val anomaly kept
    val_anomalies = [i for i, y in zip(data.val.ids, data.val.labels) if y == 1]
    assert all("/mnist/train-images" in i for i in val_anomalies)  # never the test split
    assert_same(data, build_protocol(cfg, full_data_root, seed=7))


# --------------------------------------------------------------------------- one-class


def test_one_class_mnist(full_data_root):
    cfg = DataConfig(protocol="one-class", normal={"format": "idx", "root": "mnist", "classes": [3]},
                     val_anomalies=20, limit_train=500)
    data = build_protocol(cfg, full_data_root, seed=0)
    train_labels = raw_labels(full_data_root / "mnist" / "train-labels-idx1-ubyte.gz")
    test_labels = raw_labels(full_data_root / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert len(data.train) == 500 and set(train_labels[[index_of(i) for i in data.train_ids]]) == {3}
    # test = the whole test split: the 3s are normal, every other digit is an anomaly
    digits = test_labels[[index_of(i) for i in data.test.ids]]
    assert len(data.test.ids) == 10000
    assert np.array_equal(data.test.labels, (digits != 3).astype(np.int64))
    val_digits = train_labels[[index_of(i) for i in data.val.ids]]
    assert np.array_equal(data.val.labels, (val_digits != 3).astype(np.int64)) and data.val.n_anomaly == 20
    n_threes = int((train_labels == 3).sum())
    assert data.val.n_normal == round(0.05 * n_threes)  # val_anomalies alone holds out 5% of the normal class
    assert not set(data.val.ids) & set(data.train_ids)
    assert all("train-images" in i for i in data.val.ids)


def test_one_class_cifar_gray(full_data_root):
    cfg = DataConfig(protocol="one-class", normal={"format": "folder", "root": "cifar10-jpeg", "classes": ["cat"]},
                     limit_test=400, image_size=32, channels=1)
    data = build_protocol(cfg, full_data_root, seed=0)
    assert data.train.shape == (5000, 32, 32, 1) and all("/train/cat/" in i for i in data.train_ids)
    assert len(data.val.labels) == 0
    assert (data.test.n_normal, data.test.n_anomaly) == (40, 360)  # 1000:9000 kept under the cap
    for item_id, label in zip(data.test.ids, data.test.labels):
        assert "/test/" in item_id and (("/test/cat/" in item_id) == (label == 0))


def test_one_class_needs_a_class_left_over(tmp_image_tree, tmp_path):
    root = tmp_image_tree({"good": 3})
    cfg = DataConfig(protocol="one-class", normal={"format": "folder", "root": str(root), "classes": ["good"]})
    with pytest.raises(DataError, match="covers every class .*no class is left"):
        build_protocol(cfg, None, seed=0)
    np.savez(tmp_path / "unlabeled.npz", images=np.zeros((10, 4, 4), np.uint8))
    cfg = DataConfig(protocol="one-class", normal={"format": "npz", "root": str(tmp_path / "unlabeled.npz"), "classes": [1]})
    with pytest.raises(DataError, match="unlabeled.npz has no labels"):
        build_protocol(cfg, None, seed=0)


# --------------------------------------------------------------------------- industrial


def elpv_ids(data_root: Path, keep) -> set[str]:
    rows = [line.split() for line in (data_root / "elpv" / "labels.csv").read_text().splitlines() if line.strip()]
    return {str(data_root / "elpv" / path) for path, prob, kind in rows if keep(float(prob), kind)}


def test_industrial_elpv(full_data_root):
    cfg = DataConfig(protocol="industrial", normal={"format": "elpv", "root": "elpv", "cell_type": "mono"},
                     image_size=64, val_anomalies=10)
    data = build_protocol(cfg, full_data_root, seed=0)
    normal = elpv_ids(full_data_root, lambda p, k: p == 0 and k == "mono")
    defect = elpv_ids(full_data_root, lambda p, k: p == 1 and k == "mono")
    test_normal = {i for i, y in zip(data.test.ids, data.test.labels) if y == 0}
    test_defect = {i for i, y in zip(data.test.ids, data.test.labels) if y == 1}
    val_normal = {i for i, y in zip(data.val.ids, data.val.labels) if y == 0}
    val_defect = {i for i, y in zip(data.val.ids, data.val.labels) if y == 1}
    assert data.train.shape[1:] == (64, 64, 1) and data.test.images.shape[1:] == (64, 64, 1)
    # every normal cell is in exactly one of train / val / test; about 20% in test
    assert set(data.train_ids) | val_normal | test_normal == normal
    assert len(data.train_ids) + len(val_normal) + len(test_normal) == len(normal)
    assert 0.14 < len(test_normal) / len(normal) < 0.26
    # every defective cell is evaluated: 10 in validation, the rest in test
    assert len(val_defect) == 10 and test_defect | val_defect == defect and not test_defect & val_defect
    # evaluate rebuilds the same test set, validation anomalies still excluded
    assert build_test_set(cfg, full_data_root, seed=0).ids == data.test.ids


def test_industrial_anomaly_classes_and_overlap(full_data_root):
    cfg = DataConfig(protocol="industrial", normal={"format": "elpv", "root": "elpv", "cell_type": "poly"},
                     anomaly={"format": "elpv", "root": "elpv", "cell_type": "poly", "classes": [0.667, "1.0"]},
                     limit_test=100)
    test = build_test_set(cfg, full_data_root, seed=0)
    n_poly_defects = len(elpv_ids(full_data_root, lambda p, k: p > 0.5 and k == "poly"))
    uncapped = build_test_set(cfg.model_copy(update={"limit_test": None}), full_data_root, seed=0)
    assert uncapped.n_anomaly == n_poly_defects == 452
    assert len(test.ids) == 100 and test.n_anomaly == round(100 * 452 / (452 + uncapped.n_normal))
    assert set(test.ids) <= set(uncapped.ids)
    bad = DataConfig(protocol="industrial", normal={"format": "elpv", "root": "elpv"},
                     anomaly={"format": "elpv", "root": "elpv", "classes": [0, 1]})
    with pytest.raises(DataError, match=r"both select classes \[0.0\] .*either normal or anomalous"):
        build_test_set(bad, full_data_root, seed=0)


def test_industrial_folder_tree_uses_every_defect(tmp_image_tree):
    root = tmp_image_tree({"good": 60, "scratch": 7, "dent": 5})
    cfg = DataConfig(protocol="industrial", normal={"format": "folder", "root": str(root), "classes": ["good"]})
    data = build_protocol(cfg, None, seed=0)
    assert data.test.n_anomaly == 12  # all scratches and dents: anomalies are scarce
    assert len(data.train) + data.test.n_normal == 60 and 0 < data.test.n_normal < 25
    assert all("/good/" in i for i in data.train_ids)


def test_good_images_only(tmp_image_tree):
    """A folder of good images alone: train on most, hold out a seeded slice, test set without anomalies."""
    root = tmp_image_tree({"": 80}, name="good")
    cfg = DataConfig(protocol="industrial", normal=f"folder:{root}", test_fraction=0.1, image_size=16, channels=1)
    data = build_protocol(cfg, None, seed=0)
    assert data.test.n_anomaly == 0 and 0 < data.test.n_normal < 20
    assert len(data.train) + data.test.n_normal == 80
    assert not set(data.train_ids) & set(data.test.ids)  # never test on a trained image
    assert build_test_set(cfg, None, seed=5).ids == data.test.ids  # the split is the files', not the run seed's
    defects = tmp_image_tree({"": 9}, name="bad", seed=1)
    test = build_test_set(cfg, None, seed=0, anomaly=parse_source(f"folder:{defects}"))
    assert test.n_normal == data.test.n_normal and test.n_anomaly == 9  # every defect, the same good slice
    with pytest.raises(DataError, match="needs anomalies"):
        build_protocol(cfg.model_copy(update={"val_anomalies": 3, "val_fraction": 0.1}), None, seed=0)


def test_good_only_refuses_a_tree_of_classes_without_saying_which_are_good(tmp_image_tree):
    root = tmp_image_tree({"good": 10, "scratch": 4})
    cfg = DataConfig(protocol="industrial", normal=f"folder:{root}", image_size=16, channels=1)
    with pytest.raises(DataError, match="say which are good"):
        build_protocol(cfg, None, seed=0)


@pytest.mark.parametrize("size, mode, expected", [
    ((80, 60), "RGB", (32, 3)), ((130, 140), "L", (128, 1)), ((70, 300), "L", (64, 1)), ((20, 20), "L", (32, 1)),
])
def test_auto_image_size_and_channels_come_from_the_data(tmp_image_tree, size, mode, expected):
    """The largest of 32/64/128 not above the images' short side (32 when smaller); gray iff all are gray."""
    root = tmp_image_tree({"": 6}, name="line", size=size, mode=mode)
    cfg = resolve_image_shape(DataConfig(protocol="industrial", normal=f"folder:{root}"), None)
    assert (cfg.image_size, cfg.channels) == expected
    fixed = DataConfig(protocol="industrial", normal=f"folder:{root}", image_size=64, channels=1)
    assert resolve_image_shape(fixed, None) == fixed  # the config wins


def test_mixed_gray_and_colour_images_give_a_colour_model(tmp_image_tree):
    root = tmp_image_tree({"": 4}, name="mixed", size=(40, 40), mode="L")
    tmp_image_tree({"": 2}, name="mixed", size=(40, 40), mode="RGB", seed=3, ext=".jpg")
    cfg = resolve_image_shape(DataConfig(protocol="industrial", normal=f"folder:{root}"), None)
    assert (cfg.image_size, cfg.channels) == (32, 3)


# --------------------------------------------------------------------------- evaluate's replacements


def test_replacing_either_side(full_data_root, tmp_image_tree, caplog):
    cfg = DataConfig(**FMNIST_VS_MNIST)
    normal = tmp_image_tree({"": 40}, name="good")
    test = build_test_set(cfg, full_data_root, seed=0, normal=parse_source(f"folder:{normal}"))
    assert test.n_normal == 40 and test.n_anomaly == 8  # the whole split-less folder, anomalies at 20%
    assert all(i.startswith(str(normal)) for i, y in zip(test.ids, test.labels) if y == 0)

    anomalies = tmp_image_tree({"": 30}, name="other", mode="RGB", size=(40, 40))
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        test = build_test_set(cfg, full_data_root, seed=0, anomaly=parse_source(f"folder:{anomalies}"))
    assert (test.n_normal, test.n_anomaly) == (10000, 30) and "only 30 anomalies for the 2000 wanted" in caplog.text

    test = build_test_set(cfg, full_data_root, seed=0, normal=parse_source(f"folder:{normal}"),
                          anomaly=parse_source("folder:cifar10-jpeg", ["ship"]))
    assert test.n_anomaly == 8 and all("/test/ship/" in i for i in test.ids[40:])  # a split source: its test half
    assert test.images.shape == (48, 32, 32, 1)


def test_same_seed_same_arrays_on_a_split_less_tree(tmp_image_tree):
    root = tmp_image_tree({"good": 50, "bad": 30})
    cfg = DataConfig(protocol="one-class", normal={"format": "folder", "root": str(root), "classes": ["good"]},
                     val_fraction=0.1, val_anomalies=3)
    first = build_protocol(cfg, None, seed=2)
    assert_same(first, build_protocol(cfg, None, seed=2))
    assert not set(first.train_ids) & set(first.test.ids) and not set(first.val.ids) & set(first.test.ids)
    # the train/test split follows split_seed, not the run seed
    assert set(build_protocol(cfg, None, seed=3).test.ids) == set(first.test.ids)
    moved = build_protocol(cfg.model_copy(update={"split_seed": 1}), None, seed=2)
    assert set(moved.test.ids) != set(first.test.ids)


def test_negative_seed_is_refused(data_root):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        build_protocol(DataConfig(**FMNIST_VS_MNIST), data_root, seed=-1)
