"""What the agent reads from a frame's envelope (key and headers): its ids, camera, capture time and
content type, bounded, since every one of them is outsider input copied into records."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


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
