"""Image files and bytes -> uint8 arrays, one decoding rule for training, calibration and the agent.

Gray files (1-bit, L, LA, and 16-bit, scaled to 8 bits with round(v / 257)) give HxW, everything
else HxWx3 (alpha dropped, palettes expanded); float pixels are refused. PIL's decompression-bomb
limit stays on.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


class DataError(ValueError):
    """Unreadable or inconsistent data; the message names the file and what is wrong."""


def pil_to_uint8(im: Image.Image) -> np.ndarray:
    """A decoded PIL image -> uint8 HxW or HxWx3 (16-bit gray scaled to 8 bits); ValueError for float pixels."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode.startswith("I"):  # 16-bit gray PNG/TIFF ("I;16*"), or 32-bit "I" holding 16-bit values
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"integer pixel values outside 0..65535 (mode {mode})")
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if mode in ("1", "LA", "La"):
        return np.asarray(im.convert("L"))
    if mode == "F":
        raise ValueError("floating-point images are not supported (mode F)")
    if mode in ("P", "PA"):
        im = im.convert("RGBA")  # keeps palette transparency from turning into a warning
    return np.asarray(im.convert("RGB"))


def decode_image(source: bytes | str | os.PathLike, name: str | None = None) -> np.ndarray:
    """PNG/JPEG/BMP bytes or a file -> uint8 HxW (gray) or HxWx3; DataError naming `name` when bad."""
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("image bytes" if is_bytes else str(source))
    try:
        # reading the bytes first is faster than letting PIL seek around a file for small images
        data = bytes(source) if is_bytes else Path(source).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return pil_to_uint8(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{name}: image too large to decode safely ({exc})") from None
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise DataError(f"{name}: corrupt or truncated image ({exc})") from None
