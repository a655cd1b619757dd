"""What a model will catch, told without a single defect image: synthetic defects implanted into good
images the model did not train on, scored with the deployed score and decided with the deployed
threshold.

A ladder of defects -- each kind of ama_stream.defects at sizes of 2 to 32 pixels of the images'
native scale and at two contrasts -- is implanted into held-out good images (seeded: the same
images and defects every run), and the share of each cell that alerts is its detection rate. The
smallest size caught at least 90% of the time is a kind's minimum detectable defect. When no kind is
caught below WARN_SIZE pixels at the strong contrast, the check says so loudly, with remedies.

The probes are the same generator as synthetic training negatives (loss.negatives.mode synthetic):
a kind the model trained against is flagged `seen in training`, because the check then measures
what the model was taught, not how it generalises to a defect it never saw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .defects import KINDS, implant

SIZES = (2, 4, 8, 16, 32)  # defect extent in pixels at the images' native scale
CONTRASTS = (0.25, 0.6)  # share of the intensity range the defect moves: faint, strong
PER_CELL = 6  # implanted images per (kind, size, contrast)
CAUGHT = 0.9  # a size counts as detectable when at least this share of its defects alert
WARN_SIZE = 32  # warn when nothing of this size or smaller is caught (at the strong contrast)


@dataclass
class Sensitivity:
    """Detection rates per kind x size x contrast, and what they mean."""

    rates: dict[tuple[str, int, float], float]  # (kind, size, contrast) -> share of implanted images that alert
    false_alarms: float  # share of the same good images, untouched, that alert
    n_good: int
    seen_in_training: tuple[str, ...] = ()
    sizes: tuple[int, ...] = SIZES
    contrasts: tuple[float, ...] = CONTRASTS
    kinds: tuple[str, ...] = KINDS
    minimum: dict[str, int | None] = field(default_factory=dict)  # kind -> smallest size caught >= CAUGHT (strong contrast)

    def __post_init__(self) -> None:
        strong = max(self.contrasts)
        for kind in self.kinds:
            caught = [s for s in self.sizes if self.rates.get((kind, s, strong), 0.0) >= CAUGHT]
            self.minimum[kind] = min(caught) if caught else None

    @property
    def mean_rate(self) -> float:
        return float(np.mean(list(self.rates.values()))) if self.rates else 0.0

    def warning(self) -> str | None:
        """The loud line, when no kind is caught at WARN_SIZE pixels or smaller."""
        if any(m is not None and m <= WARN_SIZE for m in self.minimum.values()):
            return None
        return (f"WARNING: at the alert threshold this model catches no synthetic defect of {WARN_SIZE} px or "
                f"smaller (spots, scratches, pasted patches, texture blends at contrast {max(self.contrasts):g}; "
                f"{100 * self.mean_rate:.0f}% of all probes caught). It will likely miss real defects of that size. "
                "Remedies: a working scale closer to native (data.scale, or smaller data.patch.size), more "
                "training steps, per-position statistics for aligned parts (data.per_position), or a looser "
                "threshold (calibrate --target-fpr).")

    def table(self) -> list[str]:
        """Plain-text lines: one row per kind and contrast, a column per size, and the minimum."""
        head = f"{'kind':10}{'contrast':>9}" + "".join(f"{s:>6}px" for s in self.sizes) + "   caught >= 90% from"
        rows = [head]
        for kind in self.kinds:
            for contrast in self.contrasts:
                cells = "".join(f"{100 * self.rates[(kind, s, contrast)]:>7.0f}%" for s in self.sizes)
                low = min((s for s in self.sizes if self.rates[(kind, s, contrast)] >= CAUGHT), default=None)
                seen = " (seen in training)" if kind in self.seen_in_training else ""
                rows.append(f"{kind:10}{contrast:>9g}{cells}   {f'{low} px' if low else 'none'}{seen}")
        rows.append(f"the same {self.n_good} good images untouched: {100 * self.false_alarms:.1f}% alert")
        return rows

    def to_json(self) -> dict:
        return {
            "sizes_px": list(self.sizes), "contrasts": list(self.contrasts), "n_good": self.n_good,
            "per_cell": PER_CELL, "false_alarms": self.false_alarms, "mean_rate": self.mean_rate,
            "seen_in_training": list(self.seen_in_training),
            "rates": {kind: {str(c): [self.rates[(kind, s, c)] for s in self.sizes] for c in self.contrasts}
                      for kind in self.kinds},
            "minimum_detectable_px": dict(self.minimum), "warning": self.warning(),
        }


def probes(good, scales=None, seed: int = 0, per_cell: int = PER_CELL):
    """(kind, size, contrast, image) for every cell of the ladder: per_cell good images (taken in turn)
    each with one defect, drawn from a generator seeded by (seed, cell), a donor for cutpaste and blend
    the next good image. `good`: uint8 images (HxW or HxWxC); `scales`: per image, its pixels per
    native pixel (an image already fitted to a model is smaller than the camera's), default 1, so a
    size always means pixels of the camera's frame."""
    if len(good) == 0:
        raise ValueError("the sensitivity check needs good images")
    scales = np.ones(len(good)) if scales is None else np.asarray(scales, float)
    k = 0
    for ci, (kind, size, contrast) in enumerate((k_, s, c) for k_ in KINDS for s in SIZES for c in CONTRASTS):
        rng = np.random.default_rng([seed, 17, ci])
        for _ in range(per_cell):
            i = k % len(good)
            host, donor = _hwc(good[i]), _hwc(good[(k + 1) % len(good)])
            out, _mask = implant(host, kind, float(size) * scales[i], contrast, rng, donor)
            k += 1
            yield kind, size, contrast, out if good[i].ndim == 3 else out[:, :, 0]


def _hwc(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else image[:, :, None]


def check(score, calibration, good, scales=None, seed: int = 0, per_cell: int = PER_CELL,
          seen_in_training: tuple[str, ...] = (), batch: int = 16) -> Sensitivity:
    """Detection rates of the ladder at `calibration`'s threshold. `score(images) -> scores`: the
    deployed score of a list of images like `good` (held-out good images, never trained on, native
    or fitted with `scales`, see probes)."""
    hits: dict[tuple[str, int, float], list[bool]] = {}
    pending: list[tuple[tuple[str, int, float], np.ndarray]] = []

    def flush() -> None:
        r = np.asarray(score([img for _, img in pending]), np.float64)
        for (cell, _), alert in zip(pending, calibration.decide(r).anomaly):
            hits.setdefault(cell, []).append(bool(alert))
        pending.clear()

    for kind, size, contrast, image in probes(good, scales, seed, per_cell):
        pending.append(((kind, size, contrast), image))
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    untouched = []
    for i in range(0, len(good), batch):
        chunk = [good[j] for j in range(i, min(i + batch, len(good)))]
        untouched.extend(calibration.decide(np.asarray(score(chunk), np.float64)).anomaly)
    rates = {cell: float(np.mean(v)) for cell, v in hits.items()}
    return Sensitivity(rates, float(np.mean(untouched)) if untouched else math.nan, len(good),
                       tuple(k for k in seen_in_training if k in KINDS))


def fitted_scorer(scorer):
    """score(images) for images already fitted to `scorer`'s model (Scorer.fit): whole-image models
    take them stacked, patch models as an object array."""
    def score(images) -> np.ndarray:
        if scorer.spec.patched:
            batch = np.empty(len(images), dtype=object)
            for i, img in enumerate(images):
                batch[i] = img
            return scorer.r_scores(batch)
        return scorer.r_scores(np.stack(images))
    return score


def seen_kinds(train_config: dict) -> tuple[str, ...]:
    """The defect kinds a model trained against (its training config's synthetic negatives), if any."""
    negatives = ((train_config or {}).get("loss") or {}).get("negatives") or {}
    if negatives.get("enabled") and negatives.get("mode") == "synthetic":
        return tuple(negatives.get("kinds") or ())
    return ()


def check_held_out(scorer, calibration, images, labels, shapes, seed: int, train_config: dict,
                   count: int = 40) -> Sensitivity:
    """The check on up to `count` good images (labels == 0, a seeded choice) of a test set fitted to
    `scorer`'s model; `shapes`: their native (height, width, ...), so sizes mean the camera's pixels."""
    good = np.flatnonzero(np.asarray(labels) == 0)
    if len(good) == 0:
        raise ValueError("the sensitivity check needs good images")
    good = np.sort(np.random.default_rng([seed, 9]).choice(good, min(count, len(good)), replace=False))
    picked = [images[i] for i in good]
    scales = None if shapes is None else [img.shape[1] / max(int(shapes[i][1]), 1) for img, i in zip(picked, good)]
    return check(fitted_scorer(scorer), calibration, picked, scales, seed=seed, seen_in_training=seen_kinds(train_config))
