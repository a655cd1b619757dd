"""Frame decoding: every accepted encoding, and every kind of bad frame refused with its reason."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ama_stream.agent.frames import JPEG, NPY, PNG, FrameError, FrameLimits, decode_frame, encode_frame, sniff_content_type
from ama_stream.sources import decode_image

LIMITS = FrameLimits(max_frame_bytes=1 << 20, max_pixels=256 * 256)
rng = np.random.default_rng(0)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode=mode).save(out, format="PNG")
    return out.getvalue()


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with a tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("shape", [(28, 28), (20, 30, 3), (16, 16, 4)])
def test_png_roundtrip(shape):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    value = encode_frame(image, PNG)
    assert sniff_content_type(value) == PNG
    np.testing.assert_array_equal(decode_frame(value, b"image/png", LIMITS), image)
    np.testing.assert_array_equal(decode_frame(value, None, LIMITS), image)  # sniffed


@pytest.mark.parametrize("shape", [(28, 28), (10, 12, 1), (20, 30, 3), (16, 16, 4)])
def test_npy_roundtrip(shape):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    value = encode_frame(image, NPY)
    np.testing.assert_array_equal(decode_frame(value, "application/x-npy", LIMITS), image)


def test_npy_fortran_order_and_header_parameters():
    image = np.asfortranarray(rng.integers(0, 256, (12, 9), dtype=np.uint8))
    np.testing.assert_array_equal(decode_frame(_npy(image), b"application/x-npy; v=1", LIMITS), image)


def test_jpeg_and_palette_png_are_converted():
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=95)
    decoded = decode_frame(out.getvalue(), JPEG, LIMITS)
    assert decoded.shape == (24, 24, 3) and decoded.dtype == np.uint8
    palette = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(palette, format="PNG")
    assert decode_frame(palette.getvalue(), None, LIMITS).shape == (24, 24, 4)
    bilevel = io.BytesIO()
    Image.fromarray(rgb[:, :, 0]).convert("1").save(bilevel, format="PNG")
    assert decode_frame(bilevel.getvalue(), None, LIMITS).shape == (24, 24)


def _reason(value, content_type=None, limits=LIMITS) -> str:
    with pytest.raises(FrameError) as info:
        decode_frame(value, content_type, limits)
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value.reason


def test_malformed_frames_are_refused_with_a_reason():
    good_png = _png(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    assert _reason(None) == "empty"
    assert _reason(b"") == "empty"
    assert _reason(rng.bytes(500)) == "undecodable"
    assert _reason(good_png[: len(good_png) // 2]) == "undecodable"  # truncated PNG
    assert _reason(b"\xff\xd8\xff\xe0" + rng.bytes(100)) == "undecodable"  # JPEG magic, garbage body
    assert _reason(good_png, b"application/x-npy") == "bad-content-type"  # header disagrees with the data
    assert _reason(good_png, b"text/plain") == "bad-content-type"
    assert _reason(b"x" * (LIMITS.max_frame_bytes + 1)) == "too-large"


def test_npy_refusals():
    assert _reason(_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)) == "unsupported-pixels"
    assert _reason(_npy(rng.random((8, 8)))) == "unsupported-pixels"  # float64
    assert _reason(_npy(np.zeros((8, 8), dtype=np.uint16))) == "unsupported-pixels"
    assert _reason(_npy(np.zeros((8, 8, 2), dtype=np.uint8))) == "bad-shape"
    assert _reason(_npy(np.zeros((2, 8, 8, 1), dtype=np.uint8))) == "bad-shape"
    assert _reason(_npy(np.zeros(64, dtype=np.uint8))) == "bad-shape"
    whole = _npy(np.zeros((8, 8), dtype=np.uint8))
    assert _reason(whole[:-5]) == "undecodable"  # truncated data
    assert _reason(whole + b"extra") == "undecodable"  # more data than the header says
    assert _reason(whole[:20]) == "undecodable"  # truncated header


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # 100000 x 100000 would need 10 GB decoded; the header alone must get it refused, fast and small.
    assert _reason(_png_header_only(100_000, 100_000)) == "too-many-pixels"
    big = _png(np.zeros((300, 300), dtype=np.uint8))
    assert _reason(big) == "too-many-pixels"
    assert decode_frame(big, None, FrameLimits(max_pixels=300 * 300)).shape == (300, 300)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (50_000, 50_000)})
    assert _reason(header.getvalue()) == "too-many-pixels"  # the header alone, no data


def test_sixteen_bit_png_is_scaled_like_the_training_loaders_do():
    pixels = np.random.default_rng(3).integers(0, 65536, (9, 7), dtype=np.uint16)
    pixels[0, :3] = (0, 65535, 257)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    frame = decode_frame(out.getvalue(), PNG, FrameLimits())
    assert frame.dtype == np.uint8 and frame.shape == (9, 7)
    assert tuple(frame[0, :3]) == (0, 255, 1)
    np.testing.assert_array_equal(frame, decode_image(out.getvalue()))  # what training and calibrate see


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(ValueError, match="uint8"):
        encode_frame(np.zeros((4, 4), dtype=np.float32), PNG)
    with pytest.raises(ValueError, match="cannot encode"):
        encode_frame(np.zeros((4, 4), dtype=np.uint8), JPEG)


def test_the_batch_pixel_budget_is_checked_from_the_header_before_decoding():
    """A frame larger than what is left of the micro-batch's budget is refused with its own reason;
    PNG and NPY alike, and the per-frame limit still comes first."""
    png, npy = _png(np.zeros((100, 100), np.uint8)), _npy(np.zeros((100, 100), np.uint8))
    for value in (png, npy):
        assert decode_frame(value, None, LIMITS, batch_pixels_left=100 * 100).shape == (100, 100)
        with pytest.raises(FrameError) as err:
            decode_frame(value, None, LIMITS, batch_pixels_left=100 * 100 - 1)
        assert err.value.reason == "batch-too-many-pixels"
    with pytest.raises(FrameError) as err:
        decode_frame(_png(np.zeros((300, 300), np.uint8)), None, LIMITS, batch_pixels_left=10**9)
    assert err.value.reason == "too-many-pixels"


def test_the_frame_decoder_spends_the_batch_budget_in_poll_order():
    """FrameDecoder (no Kafka): with room for two 64x64 frames, the third and fourth of a batch are
    dead-lettered with their values kept (for `replay`), and the positions still cover all four."""
    from types import SimpleNamespace

    from kafka.consumer.fetcher import ConsumerRecord

    from ama_stream.agent.decode import FrameDecoder, PolledBatch
    from ama_stream.preprocess import PreprocessSpec

    scorer = SimpleNamespace(spec=PreprocessSpec(image_size=32, channels=1), device=SimpleNamespace(type="cpu"))
    limits = FrameLimits(max_frame_bytes=1 << 20, max_pixels=256 * 256, max_batch_pixels=2 * 64 * 64)
    values = [_png(rng.integers(0, 256, (64, 64), dtype=np.uint8)) for _ in range(4)]
    records = [ConsumerRecord("frames", 0, -1, 10 + i, 0, 0, b"cam", v, [], None, 0, 0, 0) for i, v in enumerate(values)]
    decoded = FrameDecoder(scorer, limits)(PolledBatch(records, epoch=0))
    assert [m.offset for m in decoded.frames] == [10, 11]
    assert len(decoded.inputs) == 2 and decoded.inputs.tiles.shape == (2, 32, 32, 1)  # one tile per frame
    assert [(r.meta.offset, r.reason, r.value) for r in decoded.rejected] == [
        (12, "batch-too-many-pixels", values[2]), (13, "batch-too-many-pixels", values[3])]
    assert set(decoded.positions.values()) == {14}
