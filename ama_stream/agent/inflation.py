"""A bound on how far a compressed record batch may inflate, checked while inflating.

kafka-python inflates a compressed batch whole as soon as it reads it, before any per-frame limit
of the agent applies: one 1 MiB gzip record that inflates to 1 GiB took the agent from 742 to 3575
MiB before its frame was refused. `install(limit)` replaces the decoders kafka-python's record
parsers call by bounded ones that stop at `limit` bytes of output and raise `InflatedTooLarge`;
the FetchGuard then skips that batch's offsets with dead letters (reason `too-large`), and the
other frames flow on. Snappy blocks declare their inflated size up front, so they are refused
before anything is inflated; gzip, lz4 and zstd are inflated in a stream that stops at the limit.
"""
from __future__ import annotations

import io
import struct
import zlib

from kafka.errors import CorruptRecordError, KafkaError
from kafka.record import default_records, legacy_records

_XERIAL_MAGIC = b"\x82SNAPPY\x00"
_limit = 64 * 1024 * 1024


class InflatedTooLarge(KafkaError):
    """A compressed batch would inflate past the agent's per-batch limit."""


def _refuse(codec: str, compressed: int) -> None:
    raise InflatedTooLarge(f"a {codec} batch of {compressed} bytes inflates past the limit of {_limit} bytes "
                           "(limits.max_inflated_batch_bytes)")


def gzip_decode(data) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = inflater.decompress(bytes(data), _limit + 1)
    if len(out) > _limit or inflater.unconsumed_tail:
        _refuse("gzip", len(data))
    return out


def lz4_decode(data: bytes) -> bytes:
    import lz4.frame

    inflater = lz4.frame.LZ4FrameDecompressor()
    out = inflater.decompress(data, max_length=_limit + 1)
    if len(out) > _limit or (not inflater.eof and not inflater.needs_input):  # more output was waiting
        _refuse("lz4", len(data))
    if not inflater.eof:
        raise CorruptRecordError(f"a truncated lz4 frame of {len(data)} bytes")
    return out


def zstd_decode(data: bytes) -> bytes:
    import zstandard

    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
        out = reader.read(_limit + 1)
    if len(out) > _limit:
        _refuse("zstd", len(data))
    return out


def _varint(data: bytes, pos: int = 0) -> int:
    """The little-endian base-128 length that opens a raw snappy block."""
    value = shift = 0
    while pos < len(data) and shift < 35:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value
        pos += 1
        shift += 7
    raise InflatedTooLarge("a snappy block with a malformed length header")


def snappy_decode(data: bytes) -> bytes:
    import snappy

    blocks = []
    if data[:8] == _XERIAL_MAGIC:  # kafka-python's and Java's framing: 16-byte header, then sized blocks
        cursor = 16
        while cursor < len(data):
            (size,) = struct.unpack_from("!i", data, cursor)
            blocks.append(data[cursor + 4:cursor + 4 + size])
            cursor += 4 + size
    else:
        blocks.append(data)
    if sum(_varint(block) for block in blocks) > _limit:  # sizes are declared: refuse before inflating
        _refuse("snappy", len(data))
    return b"".join(snappy.decompress(block) for block in blocks)


def install(limit: int) -> None:
    """Bounded decoders in kafka-python's record parsers, for every consumer of this process (the
    last limit installed applies)."""
    global _limit
    _limit = int(limit)
    for module in (default_records, legacy_records):
        for name, decoder in (("gzip_decode", gzip_decode), ("snappy_decode", snappy_decode),
                              ("lz4_decode", lz4_decode), ("zstd_decode", zstd_decode)):
            if hasattr(module, name):
                setattr(module, name, decoder)
