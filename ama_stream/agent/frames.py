"""Frame values on Kafka <-> uint8 images: PNG, JPEG or NPY, with limits checked before decoding.

Decoding never trusts the producer: the byte size is checked first, then the image header
(dimensions, dtype) is read and checked against the pixel limit before any pixel data is
decompressed (decompression bombs); NPY is read with allow_pickle=False and only uint8
HxW / HxWxC (C in 1, 3, 4) is accepted. PIL's own bomb protection stays on.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ama_stream.images import pil_to_uint8

PNG = "image/png"
JPEG = "image/jpeg"
NPY = "application/x-npy"
CONTENT_TYPES = (PNG, JPEG, NPY)

_MAGIC = ((b"\x89PNG\r\n\x1a\n", PNG), (b"\xff\xd8\xff", JPEG), (b"\x93NUMPY", NPY))
_PIL_FORMAT = {PNG: "PNG", JPEG: "JPEG"}
# PIL modes converted to one of L / RGB / RGBA; 16-bit gray ("I;16*", "I") is scaled to 8 bits as
# the training loaders do (images.pil_to_uint8), so a camera scores like its training images.
# Anything else (float) is refused.
_PIL_CONVERT = {"1": "L", "L": "L", "LA": "RGBA", "P": "RGBA", "PA": "RGBA", "RGB": "RGB", "RGBA": "RGBA",
                "CMYK": "RGB", "YCbCr": "RGB"}


class FrameError(ValueError):
    """A frame that cannot be turned into an image; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


@dataclass(frozen=True)
class FrameLimits:
    max_frame_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_batch_pixels: int = 256 * 1024 * 1024  # decoded pixels per micro-batch (FrameDecoder)


def sniff_content_type(value: bytes) -> str | None:
    for magic, content_type in _MAGIC:
        if value.startswith(magic):
            return content_type
    return None


def _normalise_content_type(header: bytes | str | None) -> str | None:
    if header is None:
        return None
    text = header.decode("utf-8", "replace") if isinstance(header, bytes) else header
    return text.split(";", 1)[0].strip().lower() or None


def _check_pixels(height: int, width: int, limits: FrameLimits, batch_pixels_left: int | None) -> None:
    if height <= 0 or width <= 0:
        raise FrameError("bad-shape", f"image of {width}x{height} pixels is empty")
    if height * width > limits.max_pixels:
        raise FrameError("too-many-pixels", f"image of {width}x{height} pixels exceeds the limit of {limits.max_pixels}")
    if batch_pixels_left is not None and height * width > batch_pixels_left:
        raise FrameError("batch-too-many-pixels", f"image of {width}x{height} pixels exceeds what is left of the "
                         f"micro-batch's pixel budget ({batch_pixels_left} of {limits.max_batch_pixels})")


def _decode_pil(value: bytes, content_type: str, limits: FrameLimits, batch_pixels_left: int | None) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(value), formats=[_PIL_FORMAT[content_type]])
    except Image.DecompressionBombError as exc:
        raise FrameError("too-many-pixels", str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for garbage headers
        raise FrameError("undecodable", f"not a readable {content_type} image ({exc})") from None
    with img:
        width, height = img.size
        _check_pixels(height, width, limits, batch_pixels_left)  # from the header: nothing decompressed yet
        target = _PIL_CONVERT.get(img.mode)
        if target is None and img.mode.startswith("I"):
            return _decode_sixteen_bit(img, content_type)
        if target is None:
            raise FrameError("unsupported-pixels", f"{content_type} with pixel mode {img.mode} (only 8-bit images)")
        try:
            img.load()
            if img.mode != target:
                img = img.convert(target)
            array = np.asarray(img, dtype=np.uint8)
        except Image.DecompressionBombError as exc:
            raise FrameError("too-many-pixels", str(exc)) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise FrameError("undecodable", f"corrupt or truncated {content_type} image ({exc})") from None
    return array


def _decode_sixteen_bit(img: Image.Image, content_type: str) -> np.ndarray:
    try:
        img.load()
        return pil_to_uint8(img)
    except Image.DecompressionBombError as exc:
        raise FrameError("too-many-pixels", str(exc)) from None
    except (OSError, SyntaxError) as exc:
        raise FrameError("undecodable", f"corrupt or truncated {content_type} image ({exc})") from None
    except ValueError as exc:  # pixel values outside 16 bits
        raise FrameError("unsupported-pixels", f"{content_type} with pixel mode {img.mode}: {exc}") from None


def _decode_npy(value: bytes, limits: FrameLimits, batch_pixels_left: int | None) -> np.ndarray:
    stream = io.BytesIO(value)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported NPY format version {version}")
    except (ValueError, SyntaxError, EOFError) as exc:
        raise FrameError("undecodable", f"not a readable NPY array ({exc})") from None
    if dtype.hasobject:
        raise FrameError("unsupported-pixels", "NPY holds Python objects (pickle); refused")
    if dtype != np.uint8:
        raise FrameError("unsupported-pixels", f"NPY dtype {dtype} (expected uint8)")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise FrameError("bad-shape", f"NPY shape {shape} (expected HxW or HxWxC with C in 1, 3, 4)")
    _check_pixels(shape[0], shape[1], limits, batch_pixels_left)
    expected = int(np.prod(shape))
    available = len(value) - stream.tell()
    if available != expected:
        raise FrameError("undecodable", f"NPY data holds {available} bytes, its header promises {expected}")
    stream.seek(0)
    try:
        return np.lib.format.read_array(stream, allow_pickle=False)
    except ValueError as exc:
        raise FrameError("undecodable", f"not a readable NPY array ({exc})") from None


def decode_frame(value: bytes | None, content_type: bytes | str | None, limits: FrameLimits,
                 batch_pixels_left: int | None = None) -> np.ndarray:
    """A frame's value (+ its content-type header, if any) -> uint8 HxW or HxWxC; FrameError otherwise.

    `batch_pixels_left`: what remains of the micro-batch's pixel budget; a frame above it is refused
    from its header, before decompression."""
    if not value:
        raise FrameError("empty", "the frame has no value")
    if len(value) > limits.max_frame_bytes:
        raise FrameError("too-large", f"frame of {len(value)} bytes exceeds the limit of {limits.max_frame_bytes}")
    declared = _normalise_content_type(content_type)
    if declared is not None and declared not in CONTENT_TYPES:
        raise FrameError("bad-content-type", f"content-type {declared!r} is not one of {', '.join(CONTENT_TYPES)}")
    sniffed = sniff_content_type(value)
    if sniffed is None:
        raise FrameError("undecodable", "the value is not PNG, JPEG or NPY (no known magic bytes)")
    if declared is not None and declared != sniffed:
        raise FrameError("bad-content-type", f"content-type {declared} but the value is {sniffed}")
    try:
        if sniffed == NPY:
            return _decode_npy(value, limits, batch_pixels_left)
        return _decode_pil(value, sniffed, limits, batch_pixels_left)
    except FrameError:
        raise
    except Exception as exc:  # noqa: BLE001 -- crafted bytes make PIL and numpy raise many other types
        # (numpy's NPY header parser raised tokenize.TokenError under fuzzing): a bad frame, never a crash
        raise FrameError("undecodable", f"not a readable {sniffed} value ({type(exc).__name__}: {str(exc)[:200]})") from None


def encode_frame(image: np.ndarray, content_type: str) -> bytes:
    """uint8 HxW / HxWxC -> PNG or NPY bytes (what `produce` publishes)."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 HxW or HxWxC image, got {image.dtype} {image.shape}")
    if content_type == NPY:
        out = io.BytesIO()
        np.lib.format.write_array(out, np.ascontiguousarray(image), allow_pickle=False)
        return out.getvalue()
    if content_type == PNG:
        squeezed = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        out = io.BytesIO()
        Image.fromarray(squeezed).save(out, format="PNG", compress_level=1)  # fast; frames are small
        return out.getvalue()
    raise ValueError(f"cannot encode frames as {content_type!r}; use {PNG} or {NPY}")
