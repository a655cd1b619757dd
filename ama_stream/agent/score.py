"""The scoring stage: a decoded batch -> R from the Scorer -> decisions from the Calibration.

Runs on the run loop's thread. The Scorer gives R only; z, log A, the p-value, the anomaly flag
and the threshold all come from `Calibration.decide`. The calibration is passed in once per
batch, so a calibration swapped in between batches applies to whole batches only. A frame whose
R cannot be computed (the model raises, or R is not finite) becomes a dead letter with its value.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ama_stream.calibration import Calibration
from ama_stream.scoring import Inspection

from .decode import DecodedBatch, Rejected
from .envelope import FrameMeta

log = logging.getLogger(__name__)


@dataclass
class ScoredFrame:
    meta: FrameMeta
    r: float
    z: float
    log_a: float
    p_value: float
    anomaly: bool
    threshold: float
    inspection: Inspection | None = None  # anomalies: the anomaly map and its hottest region


@dataclass
class ScoredBatch:
    scored: list[ScoredFrame] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)  # the decoder's, then those scoring refused
    score_s: float = 0.0


def r_scores(scorer, inputs) -> tuple[np.ndarray, list | None]:
    """R of every input in one pass, and each frame's per-patch maps from the same pass when the
    scorer gives them (Scorer.scores_and_cells; None otherwise)."""
    if hasattr(scorer, "scores_and_cells"):
        r, cells = scorer.scores_and_cells(inputs)
        return np.asarray(r, dtype=np.float64), cells
    return np.asarray(scorer.r_scores(inputs, batch_size=max(1, len(inputs))), dtype=np.float64), None


def _r_one_by_one(scorer, inputs, n: int) -> tuple[np.ndarray, dict[int, str]]:
    """After a batch failed: R frame by frame, so one bad frame does not take the batch with it."""
    r, errors = np.full(n, np.nan), {}
    for i in range(n):
        try:
            r[i] = r_scores(scorer, inputs[i : i + 1])[0][0]
        except Exception as exc:  # noqa: BLE001
            errors[i] = f"{type(exc).__name__}: {exc}"
    return r, errors


def score_batch(scorer, calibration: Calibration, batch: DecodedBatch) -> ScoredBatch:
    """Scores the decoded frames; a frame that cannot be scored becomes a Rejected (with its value).

    `scorer`: the Scorer, or anything with `r_scores(inputs, batch_size) -> R`."""
    out = ScoredBatch(rejected=list(batch.rejected))
    if batch.inputs is None:
        return out
    t0 = time.perf_counter()
    n = len(batch.frames)
    cells = None
    try:
        (r, cells), errors = r_scores(scorer, batch.inputs), {}
        if len(r) != n:
            raise ValueError(f"the scorer returned {len(r)} R-scores for {n} frames")
    except Exception as exc:  # noqa: BLE001 - isolate the frame(s) that make scoring fail
        log.warning("scoring a batch of %d failed (%s); scoring its frames one by one", n, exc)
        (r, errors), cells = _r_one_by_one(scorer, batch.inputs, n), None
    ok = []
    for i in range(n):
        if i in errors:
            out.rejected.append(Rejected(batch.frames[i], batch.values[i], "score-failed", f"score-failed: {errors[i]}"))
        elif not math.isfinite(r[i]):  # never decided: NaN would pass every threshold test as normal
            out.rejected.append(Rejected(batch.frames[i], batch.values[i], "score-not-finite",
                                         f"score-not-finite: the model gave R = {r[i]} (diverged weights?)"))
        else:
            ok.append(i)
    if ok:
        metas = [batch.frames[i] for i in ok]
        d = calibration.decide(r[ok], [m.camera_id for m in metas])
        for j, meta in enumerate(metas):
            out.scored.append(ScoredFrame(
                meta=meta, r=float(r[ok[j]]), z=float(d.z[j]), log_a=float(d.log_a[j]), p_value=float(d.p_value[j]),
                anomaly=bool(d.anomaly[j]), threshold=float(d.threshold[j]),
            ))
        _locate(scorer, batch, cells, [ok[j] for j in np.flatnonzero(d.anomaly)], [f for f in out.scored if f.anomaly])
    out.score_s = time.perf_counter() - t0
    return out


# An alert's map is kept at most this many pixels on its longer side (the region is still in the
# frame's own pixels): 16 alerts on 4096x4096 frames would otherwise hold 1 GiB of maps.
ALERT_MAP_SIDE = 512


def _locate(scorer, batch: DecodedBatch, cells: list | None, rows: list[int], frames: list[ScoredFrame]) -> None:
    """Where in each anomalous frame: its anomaly map and hottest region, stitched from the per-patch
    maps of the scoring pass (only for alerts: normal frames cost nothing more). A scorer that gave no
    maps (an exported graph) goes over those frames once more. A failure costs only the region."""
    if not rows or not hasattr(scorer, "inspect_tiles"):
        return
    try:
        if cells is not None:
            grids = batch.inputs.grids
            located = [scorer.inspection(f.r, cells[i], grids[i], ALERT_MAP_SIDE) for i, f in zip(rows, frames)]
        else:
            located = scorer.inspect_tiles(batch.inputs.select(rows), ALERT_MAP_SIDE)
        for frame, inspection in zip(frames, located):
            frame.inspection = inspection
    except Exception as exc:  # noqa: BLE001 - the alert goes out without its region
        log.warning("locating %d anomalies failed (%s: %s); their alerts go out without a region", len(rows),
                    type(exc).__name__, exc)
