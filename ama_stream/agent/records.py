"""What the agent reads from a frame's envelope and what it writes: score records and dead letters.

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
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from ama_stream.scoring import Inspection

    from .score import ScoredBatch
    from .settings import TopicsSection

log = logging.getLogger(__name__)

SCORE_SCHEMA = "ama-stream/score/v1"

Headers = Sequence[tuple[str, bytes | None]]

# Bounds on what a frame's envelope may carry. Its ids are copied into every score record and its
# headers into dead letters: unbounded, one crafted frame makes records the producer must refuse.
MAX_HEADER_BYTES = 4096  # one header value (camera-id, frame-id, ...)
MAX_HEADERS_BYTES = 64 * 1024  # all header names and values together
MAX_KEY_BYTES = 4096
TRUNCATED_HEADER_BYTES = 256  # what a dead letter keeps of an oversize header


def header_value(headers: Headers | None, name: str) -> bytes | None:
    """The first header called `name` (names compare case-insensitively), or None."""
    for key, value in headers or ():
        if key.lower() == name:
            return value
    return None


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    text = value.decode("utf-8", "replace").strip()
    return text or None


MAX_EPOCH_MS_DIGITS = 16  # ms since 1970: 13 digits today, 16 for the next 300,000 years


def _epoch_ms(value: bytes | None) -> int | None:
    text = _text(value)
    if text is None:
        return None
    text = text.strip()
    # ASCII digits only: int() also reads Arabic-Indic and other Unicode digits, and "1_000"
    if not (0 < len(text) <= MAX_EPOCH_MS_DIGITS and text.isascii() and text.isdigit()):
        return None  # a malformed timestamp only costs the latency metric, not the frame
    return int(text)


@dataclass(frozen=True)
class FrameMeta:
    """Where a frame came from and what its headers say; everything but the pixels."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    frame_id: str
    camera_id: str | None
    captured_at: int | None  # ms since the epoch
    content_type: bytes | None
    envelope_error: str | None = None  # "header-too-large: ..." when the headers or key exceed the bounds

    @classmethod
    def from_record(cls, record) -> "FrameMeta":
        """From a kafka-python ConsumerRecord (value left out). Oversize headers or keys are cut to
        TRUNCATED_HEADER_BYTES here (never copied whole into a record) and set envelope_error, so
        the frame is dead-lettered with the reason."""
        headers, key, error = _bounded_envelope(tuple(record.headers or ()), record.key)
        camera_id = _text(header_value(headers, "camera-id")) or _text(key)
        fallback_id = f"{record.topic}:{record.partition}:{record.offset}"
        frame_id = (_text(header_value(headers, "frame-id")) if error is None else None) or fallback_id
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=key,
            headers=headers,
            frame_id=frame_id,
            camera_id=camera_id if error is None else None,
            captured_at=_epoch_ms(header_value(headers, "captured-at")),
            content_type=header_value(headers, "content-type"),
            envelope_error=error,
        )

    @property
    def out_key(self) -> bytes | None:
        """Output records are keyed by camera id, so one camera's records stay in order."""
        return self.camera_id.encode() if self.camera_id is not None else self.key


def _bounded_envelope(headers: tuple, key: bytes | None) -> tuple[tuple, bytes | None, str | None]:
    """(headers, key, error): oversize values cut to TRUNCATED_HEADER_BYTES, and why, if any was."""
    problems = []
    total = 0
    out = []
    for name, value in headers:
        name = str(name)[:TRUNCATED_HEADER_BYTES]
        size = len(value or b"")
        total += len(name) + size
        if size > MAX_HEADER_BYTES:
            problems.append(f"header {name!r} has {size} bytes (limit {MAX_HEADER_BYTES})")
            value = value[:TRUNCATED_HEADER_BYTES]
        out.append((name, value))
    if total > MAX_HEADERS_BYTES:
        problems.append(f"headers have {total} bytes in all (limit {MAX_HEADERS_BYTES})")
        kept, running = [], 0
        for name, value in out:  # keep what fits, in order
            running += len(name) + len(value or b"")
            if running > MAX_HEADERS_BYTES:
                break
            kept.append((name, value))
        out = kept
    if key is not None and len(key) > MAX_KEY_BYTES:
        problems.append(f"key has {len(key)} bytes (limit {MAX_KEY_BYTES})")
        key = key[:TRUNCATED_HEADER_BYTES]
    error = "header-too-large: " + "; ".join(problems) + " (cut in this dead letter)" if problems else None
    return tuple(out), key, error


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
    h, w = anomaly_map.shape
    top = float(np.nanmax(anomaly_map)) if anomaly_map.size else 0.0
    scaled = np.nan_to_num(anomaly_map.astype(np.float32) * (255.0 / top if top > 0 else 0.0), nan=255.0)
    image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    factor = side / max(h, w)
    if factor < 1:
        image = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
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
    `model_id` and `calibration_id` are those of the model that scored the batch (reload.Model)."""

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
