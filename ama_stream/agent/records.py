"""What the agent writes: score records, alerts, heatmaps and dead letters (the frame's envelope it
reads is envelope.py).

`RecordBuilder` turns a scored batch into the messages that finish its frames (score record,
alert, dead letter, each with the fallback sent if the broker refuses it). The formats are
documented for users in docs/wire-format.md; change them only together with SCORE_SCHEMA.
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ama_stream.tiling import map_shape

from .envelope import FrameMeta

if TYPE_CHECKING:
    from ama_stream.scoring import Inspection

    from .score import ScoredBatch
    from .settings import TopicsSection

log = logging.getLogger(__name__)

SCORE_SCHEMA = "ama-stream/score/v1"

__all__ = ["SCORE_SCHEMA", "FrameMeta", "OutMessage", "RecordBuilder", "dead_letter_headers", "encode_record",
           "heatmap_png", "record_headers", "score_record"]  # FrameMeta: envelope.py's, for older imports


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def score_record(
    meta: FrameMeta,
    *,
    r_score: float,
    z: float,
    log_a: float,
    p_value: float,
    anomaly: bool,
    threshold: float,
    model_id: str,
    calibration_id: str,
    scored_at: int,
    inspection: "Inspection | None" = None,
) -> dict[str, Any]:
    record = {
        "schema": SCORE_SCHEMA,
        "frame_id": meta.frame_id,
        "camera_id": meta.camera_id,
        "topic": meta.topic,
        "partition": meta.partition,
        "offset": meta.offset,
        "r_score": _finite(r_score),
        "z": _finite(z),
        "log_a": _finite(log_a),
        "p_value": _finite(p_value),
        "anomaly": bool(anomaly),
        "threshold": _finite(threshold),
        "model_id": model_id,
        "calibration_id": calibration_id,
        "captured_at": meta.captured_at,
        "scored_at": scored_at,
    }
    if inspection is not None:  # optional v1 fields, anomalies only: where in the frame (its own pixels)
        x, y, w, h = inspection.region
        record["region"] = {"x": x, "y": y, "w": w, "h": h}
        record["map_max"] = _finite(inspection.map_max)
    return record


MAP_SIDE = 256  # the maps topic's heatmaps: longer side at most this many pixels (a few KiB of PNG)


def heatmap_png(anomaly_map: np.ndarray, side: int = MAP_SIDE) -> bytes:
    """The map as an 8-bit gray PNG, 0 = 0 and 255 = the map's maximum, shrunk so its longer side is
    at most `side` pixels (same aspect as the frame)."""
    top = float(np.nanmax(anomaly_map)) if anomaly_map.size else 0.0
    scaled = np.nan_to_num(anomaly_map.astype(np.float32) * (255.0 / top if top > 0 else 0.0), nan=255.0)
    image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    h, w = map_shape(anomaly_map.shape, side)  # the same shrinking rule as the Scorer's bounded maps
    if (h, w) != anomaly_map.shape:
        image = image.resize((w, h), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


def record_headers(meta: FrameMeta) -> list[tuple[str, bytes]]:
    headers = [("content-type", b"application/json"), ("frame-id", meta.frame_id.encode())]
    if meta.camera_id is not None:
        headers.append(("camera-id", meta.camera_id.encode()))
    return headers


def dead_letter_headers(meta: FrameMeta, error: str) -> list[tuple[str, bytes | None]]:
    """The frame's own headers, then `error` and where the frame was read from."""
    return [
        *meta.headers,
        ("error", error.encode("utf-8", "replace")),
        ("source-topic", meta.topic.encode()),
        ("source-partition", str(meta.partition).encode()),
        ("source-offset", str(meta.offset).encode()),
    ]


@dataclass(frozen=True)
class OutMessage:
    """One record to publish. A refused one is replaced by `fallback` (see publish.py)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    dead_letter: bool = False
    fallback: "OutMessage | None" = None  # sent instead when this one is refused
    refusals: int = 0

    def without_value(self, why: str) -> "OutMessage":
        """A dead letter whose original value the producer refuses (too large): keep headers, say so."""
        return replace(self, value=b"" if self.key is None else None, fallback=None, refusals=0,
                       headers=[*self.headers, ("error-value-dropped", why.encode("utf-8", "replace")[:1024])])

    def next_after_refusal(self, why: str) -> "OutMessage | None":
        """What to send after this message was refused for good: its fallback, else (a dead letter
        with a value) itself without the value, else nothing."""
        if self.fallback is not None:
            return self.fallback
        if self.dead_letter and self.value:
            return self.without_value(why)
        return None


class RecordBuilder:
    """A scored batch -> its messages: per scored frame a score record (if the scores topic is on)
    and, for an anomaly, the same record on the alerts topic; per rejected frame a dead letter.
    `model_id` and `calibration_id` are those of the model that scored the batch (model_state.Model)."""

    def __init__(self, topics: "TopicsSection"):
        self.scores = topics.scores
        self.alerts = topics.alerts
        self.dead_letter = topics.dead_letter
        self.maps = topics.maps

    def build(self, result: "ScoredBatch", model_id: str, calibration_id: str, scored_at: int) -> list[OutMessage]:
        out: list[OutMessage] = []
        for f in result.scored:
            record = score_record(
                f.meta, r_score=f.r, z=f.z, log_a=f.log_a, p_value=f.p_value, anomaly=f.anomaly,
                threshold=f.threshold, model_id=model_id, calibration_id=calibration_id, scored_at=scored_at,
                inspection=f.inspection,
            )
            value, headers = encode_record(record), record_headers(f.meta)
            # if the broker refuses the record, the frame is dead-lettered (headers only) instead;
            # one fallback per frame (on its first record): a refused score AND alert is still one dead letter
            fallback = OutMessage(self.dead_letter, f.meta.key, b"" if f.meta.key is None else None,
                                  dead_letter_headers(f.meta, "record-refused: the score record could not be published"),
                                  dead_letter=True)
            if self.scores:
                out.append(OutMessage(self.scores, f.meta.out_key, value, headers, fallback=fallback))
            if f.anomaly:
                out.append(OutMessage(self.alerts, f.meta.out_key, value, headers,
                                      fallback=None if self.scores else fallback))
            if f.anomaly and self.maps and f.inspection is not None:  # keyed by frame id; refused: given up
                out.append(OutMessage(self.maps, f.meta.frame_id.encode(), heatmap_png(f.inspection.map),
                                      [("content-type", b"image/png"), *headers[1:],
                                       ("map-max", repr(f.inspection.map_max).encode())]))
        for rej in result.rejected:
            log.debug("dead-lettering frame %s: %s", rej.meta.frame_id, rej.error)
            value = rej.value if rej.value is not None or rej.meta.key is not None else b""
            headers = [(k, v if v is not None else b"") for k, v in dead_letter_headers(rej.meta, rej.error)]
            out.append(OutMessage(self.dead_letter, rej.meta.key, value, headers, dead_letter=True))
        return out
