"""The paper's evaluation protocols (paper section 4.1) on top of ama_stream.sources.

cross       every class of data.normal is normal (or data.normal.classes); test = the normal test split
            + anomalies from data.anomaly's test split, sampled to anomaly_fraction x the normal test count.
one-class   data.normal.classes are normal, every other class of the same source is an anomaly;
            train = the normal classes of the train split, test = the whole test split.
industrial  scarce labelled defects: the normal classes (ELPV: defect probability 0 by default) are split
            into train/test and every anomaly (data.anomaly; ELPV default: probability 1.0 of the same
            source; other sources: every other class of data.normal) goes to the test set.

Training data holds normal images only. Validation (model selection) is carved from the normal training
split (val_fraction) and gets val_anomalies labelled anomalies, drawn from images the test set never
sees; by default there is none (the paper's default: keep the last epoch) and every normal training
image is trained on. Sampling is seeded by the run seed; the train/test split of sources without a
built-in one is seeded by split_seed, which stays fixed by default so that `evaluate --seed N` never
moves training images into the test set.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ama_stream.preprocess import PreprocessSpec
from ama_stream.settings import Section
from ama_stream.sources import (
    ELPV_TOLERANCE,
    DataError,
    LabeledImages,
    SourceSpec,
    has_builtin_split,
    load_images,
    native_shapes,
    source_classes,
)

log = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.05
ELPV_NORMAL_CLASSES = (0.0,)
ELPV_ANOMALY_CLASSES = (1.0,)

# Independent random streams per purpose, so that changing one setting does not reshuffle the others.
_VAL_SPLIT, _VAL_ANOMALIES, _TEST_ANOMALIES, _LIMIT_TRAIN, _LIMIT_VAL, _LIMIT_TEST = range(1, 7)


class PatchSection(Section):
    """A patch model: trained on random size x size crops of the good images, and scoring an image by
    tiling it with such patches `stride` pixels apart (overlapping when stride < size)."""

    size: int = Field(64, ge=16)  # the model's input in pixels: a power of two
    stride: int = Field(32, ge=1)  # pixels between neighbouring patches when scoring (<= size; half of it overlaps them)

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.stride > self.size:
            raise ValueError(f"patch.stride ({self.stride}) must not exceed patch.size ({self.size}): pixels would be skipped")
        return self


class DataConfig(Section):
    """The `data:` block of a training config."""

    protocol: Literal["cross", "one-class", "industrial"]  # cross: another dataset is the anomalies; one-class: the other classes; industrial: defects (or none: good images only)
    normal: SourceSpec
    anomaly: SourceSpec | None = None
    # "auto": from the normal images -- the largest of AUTO_SIZES not above their short side (32 when
    # smaller), gray when every image is gray; resolved and logged before training
    image_size: int | Literal["auto"] = "auto"
    channels: Literal[1, 3, "auto"] = "auto"  # 1 = gray, 3 = colour, auto (see image_size)
    resize: Literal["auto", "pad", "resize"] = "auto"  # see ama_stream.preprocess.fit_image
    # a patch model instead of whole images fitted to image_size: images keep their aspect, scaled by
    # `scale` (1 = native pixels), and are tiled with patches (image_size is then patch.size)
    patch: PatchSection | None = None
    # patch model: working scale of the images (1 = native pixels); auto: the good images' median short
    # side brought to AUTO_WORKING_SIDE pixels (never enlarged), resolved from the file headers
    scale: float | Literal["auto"] = 1.0
    top_k: int = Field(1, ge=1)  # patch model: an image's score is the mean of its k highest patch scores
    # patch model: score each patch against the good images' scores at the same place (aligned parts, one
    # camera set-up): auto = when every good image has the same size; on = always (other sizes are resized
    # to the most common one); off = never
    per_position: Literal["auto", "on", "off"] = "auto"
    # resolved from per_position and the images (never set by hand): the working (height, width) of the
    # per-position statistics, or None
    frame_size: tuple[int, int] | None = None
    anomaly_fraction: float = Field(0.2, gt=0)  # cross: anomalies per normal test image
    test_fraction: float = Field(0.2, gt=0, lt=1)  # test share of sources without a built-in split
    split_seed: int = Field(0, ge=0)  # seed of that split (not the run seed: see the module docstring)
    # normal training images held out for validation; None: 0.05 with val_anomalies, else 0 (train on all)
    val_fraction: float | None = Field(None, ge=0, lt=1)
    val_anomalies: int = Field(0, ge=0)  # labelled anomalies in validation (the paper's model selection)
    limit_train: int | None = Field(None, ge=1)  # cap on training images (seeded subsample)
    limit_test: int | None = Field(None, ge=2)  # cap on the test set (anomaly ratio kept) and on normal val images

    @model_validator(mode="after")
    def _check_protocol(self):
        for side in ("normal", "anomaly"):
            spec = getattr(self, side)
            if spec is not None and spec.split is not None:
                raise ValueError(f"data.{side}.split: the protocol chooses the train and test splits; remove it")
        if self.protocol == "cross" and self.anomaly is None:
            raise ValueError("the cross protocol needs data.anomaly (the source of anomalies)")
        if self.protocol == "one-class":
            if self.normal.classes is None:
                raise ValueError("the one-class protocol needs data.normal.classes (the normal class)")
            if self.anomaly is not None:
                raise ValueError("the one-class protocol takes its anomalies from the other classes of "
                                 "data.normal; remove data.anomaly")
        if self.val_anomalies and self.val_fraction == 0:
            raise ValueError("val_anomalies needs normal validation images too: set val_fraction > 0")
        if self.scale != "auto" and not 0 < self.scale <= 4:
            raise ValueError(f"scale must be in (0, 4] or auto, got {self.scale}")
        if self.patch is not None:
            if self.image_size not in ("auto", self.patch.size):
                raise ValueError(f"a patch model's input is its patch: image_size {self.image_size} differs from "
                                 f"patch.size {self.patch.size} (leave image_size auto)")
            object.__setattr__(self, "image_size", self.patch.size)
        return self

    def effective_val_fraction(self) -> float:
        if self.val_fraction is not None:
            return self.val_fraction
        return DEFAULT_VAL_FRACTION if self.val_anomalies else 0.0

    @property
    def shape_is_auto(self) -> bool:
        return self.image_size == "auto" or self.channels == "auto" or self.scale == "auto"

    def preprocess_spec(self) -> PreprocessSpec:
        if self.shape_is_auto:
            raise ValueError("data.image_size/channels are 'auto': resolve them from the data first (resolve_image_shape)")
        if self.patch is not None:
            return PreprocessSpec(image_size=self.patch.size, channels=self.channels, resize=self.resize,
                                  patch_stride=self.patch.stride, scale=self.scale, top_k=self.top_k,
                                  frame_size=self.frame_size or ())
        return PreprocessSpec(image_size=self.image_size, channels=self.channels, resize=self.resize)


AUTO_SIZES = (32, 64, 128)
AUTO_WORKING_SIDE = 128  # data.scale auto: a patch model works on images whose short side is about this


def _frame_size(cfg: DataConfig, shapes: np.ndarray) -> tuple[int, int] | None:
    """A patch model's per-position working size: the scaled size of the good images when they all
    have one (per_position auto) or of the most common size (on); None when off or sizes vary."""
    if cfg.patch is None or cfg.per_position == "off" or len(shapes) == 0:
        return None
    sizes, counts = np.unique(shapes[:, :2], axis=0, return_counts=True)
    if len(sizes) > 1 and cfg.per_position == "auto":
        log.info("per-position statistics off: the good images have %d different sizes", len(sizes))
        return None
    h, w = (int(v) for v in sizes[int(np.argmax(counts))])
    scale = float(cfg.scale)
    size = (max(cfg.patch.size, round(h * scale)), max(cfg.patch.size, round(w * scale)))
    log.info("per-position statistics on: images worked on at %dx%d (%dx%d native x %g)", size[1], size[0], w, h,
             cfg.scale)
    return size


def resolve_image_shape(cfg: DataConfig, data_root: str | os.PathLike | None) -> DataConfig:
    """cfg with an "auto" image_size/channels (and a patch model's per-position working size) replaced
    from the normal images' file headers."""
    if not cfg.shape_is_auto and (cfg.patch is None or cfg.per_position == "off" or cfg.frame_size):
        return cfg
    shapes = native_shapes(cfg.normal, data_root, seed=cfg.split_seed)
    if cfg.scale == "auto" and len(shapes):
        short_side = float(np.median(shapes[:, :2].min(axis=1)))
        scale = round(min(1.0, AUTO_WORKING_SIDE / short_side), 4)
        log.info("working scale from the data: %g (median short side %.0f px -> %.0f px)", scale, short_side,
                 short_side * scale)
        cfg = cfg.model_copy(update={"scale": scale})
    if len(shapes) == 0:
        raise DataError(f"{cfg.normal}: no readable image to choose the model size from")
    short = int(shapes[:, :2].min())
    size = cfg.image_size
    if size == "auto":
        fitting = [s for s in AUTO_SIZES if s <= short]
        size = fitting[-1] if fitting else AUTO_SIZES[0]
    channels = cfg.channels
    if channels == "auto":
        channels = 1 if bool((shapes[:, 2] == 1).all()) else 3
    if cfg.shape_is_auto:
        log.info("model input from the data: %dx%d, %s (%d images looked at; shortest side %d px%s)", size, size,
                 "gray" if channels == 1 else "colour", len(shapes), short,
                 "" if cfg.image_size != "auto" or short >= size else f", padded or resized up to {size}")
    return cfg.model_copy(update={"image_size": size, "channels": channels,
                                  "frame_size": cfg.frame_size or _frame_size(cfg, shapes)})


@dataclass(frozen=True)
class EvalSet:
    images: np.ndarray  # uint8 [N, S, S, C]
    labels: np.ndarray  # int64 [N]: 1 = anomaly, 0 = normal
    ids: tuple[str, ...]
    shapes: np.ndarray | None = None  # int32 [N, 3]: native (height, width, channels), when known

    @property
    def n_normal(self) -> int:
        return int(np.sum(self.labels == 0))

    @property
    def n_anomaly(self) -> int:
        return int(np.sum(self.labels == 1))


@dataclass(frozen=True)
class ProtocolData:
    train: np.ndarray  # uint8 [N, S, S, C], normal images only
    train_ids: tuple[str, ...]
    val: EvalSet  # empty when no validation images are held out
    test: EvalSet

    def summary(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "val_normal": self.val.n_normal,
            "val_anomaly": self.val.n_anomaly,
            "test_normal": self.test.n_normal,
            "test_anomaly": self.test.n_anomaly,
        }


@dataclass(frozen=True)
class _Plan:
    """Which images form each side of a protocol."""

    normal: SourceSpec
    anomaly: SourceSpec | None  # None: good images only (industrial protocol without defects)
    anomaly_test_split: Literal["test", "all"]  # industrial: every anomaly is for evaluation
    anomaly_val_split: Literal["train", "all"]  # "all": val picks are removed from the test pool
    sample_anomalies: bool  # cross: sample the test anomalies to anomaly_fraction x normal count


class _Reader:
    """Loads (spec, split) once per protocol build."""

    def __init__(self, cfg: DataConfig, data_root: str | os.PathLike | None):
        self.cfg = cfg
        self.data_root = data_root
        self._loaded: dict[SourceSpec, LabeledImages] = {}

    def load(self, spec: SourceSpec, split: Literal["train", "test", "all"] | None = None) -> LabeledImages:
        spec = spec.with_split(split) if split is not None else spec
        if spec not in self._loaded:
            self._loaded[spec] = load_images(spec, self.data_root, self.cfg.preprocess_spec(),
                                             seed=self.cfg.split_seed, test_fraction=self.cfg.test_fraction)
        return self._loaded[spec]

    def load_replacement(self, spec: SourceSpec) -> LabeledImages:
        """A --normal/--anomaly source: its own split if set, else its test split, else all of it."""
        if spec.split is None:
            spec = spec.with_split("test" if has_builtin_split(spec, self.data_root) else "all")
        return self.load(spec)


def _same_class(fmt: str, a: str | int | float, b: str | int | float) -> bool:
    return abs(float(a) - float(b)) <= ELPV_TOLERANCE if fmt == "elpv" else a == b


def _remaining_classes(spec: SourceSpec, names: tuple[str, ...]) -> list[str]:
    """The class names of the source that `spec` does not select."""
    others = []
    for name in names:
        value = spec.with_classes([name]).classes[0]  # the name as the format compares it
        if not any(_same_class(spec.format, value, wanted) for wanted in spec.classes or ()):
            others.append(name)
    return others


def _other_classes(spec: SourceSpec, data_root: str | os.PathLike | None) -> SourceSpec:
    """The same source with every class that `spec` does not select."""
    names = source_classes(spec, data_root)
    if not names:
        raise DataError(f"{spec.root} has no labels, so no other class can serve as anomalies")
    others = _remaining_classes(spec, names)
    if not others:
        raise DataError(f"data.normal.classes covers every class of {spec.root} ({', '.join(names)}); "
                        "no class is left to serve as anomalies")
    return spec.with_classes(others)


def _check_disjoint(normal: SourceSpec, anomaly: SourceSpec) -> None:
    """A class of one source cannot be normal and anomalous at once."""
    if (normal.format, normal.root) != (anomaly.format, anomaly.root):
        return
    if normal.cell_type and anomaly.cell_type and normal.cell_type != anomaly.cell_type:
        return
    if normal.classes is None or anomaly.classes is None:
        overlap = "all"
    else:
        overlap = [c for c in anomaly.classes if any(_same_class(normal.format, c, n) for n in normal.classes)]
    if overlap:
        raise DataError(f"data.normal and data.anomaly both select classes {overlap} of {normal.root}; "
                        "a class is either normal or anomalous")


def _plan(cfg: DataConfig, data_root: str | os.PathLike | None) -> _Plan:
    if cfg.protocol == "one-class":
        return _Plan(cfg.normal, _other_classes(cfg.normal, data_root), "test", "train", sample_anomalies=False)
    if cfg.protocol == "cross":
        assert cfg.anomaly is not None  # checked by DataConfig
        _check_disjoint(cfg.normal, cfg.anomaly)
        return _Plan(cfg.normal, cfg.anomaly, "test", "train", sample_anomalies=True)
    normal = cfg.normal
    if normal.format == "elpv" and normal.classes is None:
        normal = normal.with_classes(ELPV_NORMAL_CLASSES)
    if cfg.anomaly is not None:
        anomaly = cfg.anomaly
    elif normal.format == "elpv":
        anomaly = normal.with_classes(ELPV_ANOMALY_CLASSES)
    else:
        anomaly = _good_only_or_other_classes(normal, data_root)
    if anomaly is not None:
        _check_disjoint(normal, anomaly)
    return _Plan(normal, anomaly, "all", "all", sample_anomalies=False)


def _good_only_or_other_classes(normal: SourceSpec, data_root: str | os.PathLike | None) -> SourceSpec | None:
    """Industrial without data.anomaly: a folder of good images alone trains on good images only
    (None); with classes selected, the source's other classes (if any) are the anomalies."""
    names = source_classes(normal, data_root)
    if normal.classes is None:
        if len(names) > 1:
            raise DataError(f"{normal.root} holds the classes {', '.join(names)}: say which are good with "
                            "data.normal.classes (the others become the test anomalies), or point data.normal "
                            "at the folder of good images")
        return None
    others = _remaining_classes(normal, names)
    return normal.with_classes(others) if others else None


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose])


def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k of range(n) without replacement, in ascending order (all of them when k >= n)."""
    if k >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def _eval_set(normal: LabeledImages, anomaly: LabeledImages) -> EvalSet:
    images = np.concatenate([normal.images, anomaly.images])
    labels = np.concatenate([np.zeros(len(normal), np.int64), np.ones(len(anomaly), np.int64)])
    shapes = None
    if normal.shapes is not None and anomaly.shapes is not None:
        shapes = np.concatenate([normal.shapes, anomaly.shapes])
    return EvalSet(images, labels, normal.ids + anomaly.ids, shapes)


def _limit(evalset: EvalSet, limit: int | None, rng: np.random.Generator) -> EvalSet:
    """At most `limit` images, both sides subsampled so the anomaly ratio stays as it was."""
    n = len(evalset.labels)
    if limit is None or n <= limit:
        return evalset
    normal_idx = np.flatnonzero(evalset.labels == 0)
    anomaly_idx = np.flatnonzero(evalset.labels == 1)
    k_anomaly = round(limit * len(anomaly_idx) / n)
    if len(anomaly_idx) and len(normal_idx):
        k_anomaly = min(max(k_anomaly, 1), limit - 1)  # keep both classes
    keep = np.concatenate([normal_idx[_sample(len(normal_idx), limit - k_anomaly, rng)],
                           anomaly_idx[_sample(len(anomaly_idx), k_anomaly, rng)]])
    return EvalSet(evalset.images[keep], evalset.labels[keep], tuple(evalset.ids[i] for i in keep),
                   None if evalset.shapes is None else evalset.shapes[keep])


def _val_anomaly_picks(cfg: DataConfig, pool: LabeledImages, seed: int) -> np.ndarray:
    if len(pool) < cfg.val_anomalies:
        log.warning("only %d anomalies available for validation (val_anomalies=%d)", len(pool), cfg.val_anomalies)
    return _sample(len(pool), cfg.val_anomalies, _rng(seed, _VAL_ANOMALIES))


def _test_set(cfg: DataConfig, reader: _Reader, plan: _Plan, seed: int,
              normal: SourceSpec | None, anomaly: SourceSpec | None) -> EvalSet:
    normal_test = reader.load_replacement(normal) if normal else reader.load(plan.normal, "test")
    if anomaly is not None:  # sampled as the protocol samples its own (cross: to anomaly_fraction)
        pool, sample = reader.load_replacement(anomaly), plan.sample_anomalies
    elif plan.anomaly is None:  # good images only: the held-out good slice is the whole test set
        return _limit(_eval_set(normal_test, normal_test.take([])), cfg.limit_test, _rng(seed, _LIMIT_TEST))
    else:
        pool, sample = reader.load(plan.anomaly, plan.anomaly_test_split), plan.sample_anomalies
        if plan.anomaly_val_split == "all" and cfg.val_anomalies:
            # validation anomalies come out of the same pool: never test on them
            picked = set(_val_anomaly_picks(cfg, pool, seed).tolist())
            pool = pool.take([i for i in range(len(pool)) if i not in picked])
    if sample:
        wanted = round(cfg.anomaly_fraction * len(normal_test))
        if wanted > len(pool):
            log.warning("only %d anomalies for the %d wanted (anomaly_fraction %.3g of %d normal test images); "
                        "using all of them", len(pool), wanted, cfg.anomaly_fraction, len(normal_test))
        pool = pool.take(_sample(len(pool), wanted, _rng(seed, _TEST_ANOMALIES)))
    if len(normal_test) == 0 or len(pool) == 0:
        raise DataError(f"the test set needs normal images and anomalies; found {len(normal_test)} normal "
                        f"and {len(pool)} anomalous")
    return _limit(_eval_set(normal_test, pool), cfg.limit_test, _rng(seed, _LIMIT_TEST))


def holdout_record(test: EvalSet) -> dict:
    """What a checkpoint records of its held-out normal test images (never trained on), so that
    `evaluate` can check it scores the same slice: their count and a digest of their sorted ids."""
    ids = sorted(test.ids[i] for i in np.flatnonzero(test.labels == 0))
    return {"holdout_normal_count": len(ids),
            "holdout_normal_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def build_test_set(
    cfg: DataConfig,
    data_root: str | os.PathLike | None,
    seed: int,
    normal: SourceSpec | None = None,
    anomaly: SourceSpec | None = None,
) -> EvalSet:
    """The protocol's test set; `normal` / `anomaly` replace that side (a replaced anomaly side is
    sampled as the protocol samples its own anomalies: to anomaly_fraction of the normal count for
    cross, whole otherwise; a replacement without a split is used whole). A good-only industrial
    protocol without a replacement gives the held-out good images alone (no anomalies)."""
    _check_seed(seed)
    plan = _plan(cfg, data_root)
    cfg = resolve_image_shape(cfg, data_root)
    reader = _Reader(cfg, data_root)
    test = _test_set(cfg, reader, plan, seed, normal, anomaly)
    log.info("test set: %d normal + %d anomalies", test.n_normal, test.n_anomaly)
    return test


def build_protocol(cfg: DataConfig, data_root: str | os.PathLike | None, seed: int) -> ProtocolData:
    """Train (normal only), validation and test data of cfg.protocol, reproducible for a seed."""
    _check_seed(seed)
    plan = _plan(cfg, data_root)
    cfg = resolve_image_shape(cfg, data_root)
    reader = _Reader(cfg, data_root)
    pool = reader.load(plan.normal, "train")
    order = _rng(seed, _VAL_SPLIT).permutation(len(pool))
    val_fraction = cfg.effective_val_fraction()
    n_val = round(val_fraction * len(pool))
    if val_fraction and len(pool) > 1:
        n_val = max(n_val, 1)
    val_normal, train = pool.take(np.sort(order[:n_val])), pool.take(np.sort(order[n_val:]))
    if cfg.limit_train is not None and len(train) > cfg.limit_train:
        train = train.take(_sample(len(train), cfg.limit_train, _rng(seed, _LIMIT_TRAIN)))
    if len(train) == 0:
        raise DataError(f"no normal training images left in {plan.normal} after holding out validation")
    if cfg.val_anomalies and plan.anomaly is None:
        raise DataError("data.val_anomalies needs anomalies: this protocol has good images only (add data.anomaly)")
    val_anomalies = reader.load(plan.anomaly, plan.anomaly_val_split) if cfg.val_anomalies else None
    if val_anomalies is not None:
        val_anomalies = val_anomalies.take(_val_anomaly_picks(cfg, val_anomalies, seed))
    else:
        val_anomalies = LabeledImages(pool.images[:0], pool.labels[:0], pool.class_names, ())
    if cfg.limit_test is not None and len(val_normal) > cfg.limit_test:
        val_normal = val_normal.take(_sample(len(val_normal), cfg.limit_test, _rng(seed, _LIMIT_VAL)))
    val = _eval_set(val_normal, val_anomalies)
    test = _test_set(cfg, reader, plan, seed, None, None)
    data = ProtocolData(train.images, train.ids, val, test)
    log.info("%s protocol: %s", cfg.protocol, data.summary())
    return data
