"""Turning decoded uint8 images into the model's input, identically in training and serving.

An image arrives as a uint8 array HxW or HxWxC (C = 1, 3 or 4). `fit_image` converts the
channels and brings it to the model size (zero-padding a smaller image such as MNIST's 28x28
into 32x32, or resizing with antialiasing); `to_tensor` scales a stack of fitted images to
[-1, 1] in NCHW layout.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

RESIZE_MODES = ("auto", "pad", "resize")


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int = 32
    channels: int = 1
    # auto: pad when the image is smaller than the model size and square-ish, else resize
    resize: str = "auto"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        return cls(**data)


def _convert_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """HxW or HxWxC uint8 -> HxWxchannels uint8 (ITU-R 601 luma for RGB -> gray)."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image HxW or HxWxC with C in 1, 3, 4; got shape {img.shape}")
    if img.shape[2] == 4:  # drop alpha
        img = img[:, :, :3]
    if img.shape[2] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=2)
    gray = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None]


def fit_image(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Any uint8 image -> [S, S, C] uint8 for the model."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy image, got {getattr(img, 'dtype', type(img))}")
    if img.size == 0:
        raise ValueError(f"empty image of shape {img.shape}")
    img = _convert_channels(img, spec.channels)
    h, w, _ = img.shape
    s = spec.image_size
    if (h, w) == (s, s):
        return img
    pad = spec.resize == "pad" or (spec.resize == "auto" and h <= s and w <= s and (s - h) <= s // 4 and (s - w) <= s // 4)
    if pad and h <= s and w <= s:
        out = np.zeros((s, s, img.shape[2]), dtype=np.uint8)
        top, left = (s - h) // 2, (s - w) // 2
        out[top : top + h, left : left + w] = img
        return out
    mode = "L" if img.shape[2] == 1 else "RGB"
    pil = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode)
    pil = pil.resize((s, s), resample=Image.BILINEAR, reducing_gap=None)
    out = np.asarray(pil, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, S, S, C] uint8 -> [N, C, S, S] float32 in [-1, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, S, S, C], got {images.dtype} {images.shape}")
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return t.float().div_(127.5).sub_(1.0)


def prepare_batch(images: list[np.ndarray] | np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Decoded images (any sizes) -> model input [N, C, S, S]."""
    fitted = np.stack([fit_image(img, spec) for img in images]) if len(images) else np.zeros(
        (0, spec.image_size, spec.image_size, spec.channels), dtype=np.uint8
    )
    return to_tensor(fitted)


def native_shape(img: np.ndarray) -> tuple[int, int, int]:
    """(height, width, channels) of a decoded image as it arrived."""
    return (int(img.shape[0]), int(img.shape[1]), int(img.shape[2]) if img.ndim == 3 else 1)


def fit_reasons(shape: tuple[int, int, int], spec: PreprocessSpec) -> tuple[str, ...]:
    """Why an image of native (h, w, c) does not enter the model as it is: "padded" or "resized"
    (its size), and "channels" (gray <-> colour, alpha dropped)."""
    h, w, c = shape
    reasons = []
    s = spec.image_size
    if (h, w) != (s, s):
        pads = spec.resize == "pad" or (spec.resize == "auto" and h <= s and w <= s and s - h <= s // 4 and s - w <= s // 4)
        reasons.append("padded" if pads and h <= s and w <= s else "resized")
    if (3 if c == 4 else c) != spec.channels:
        reasons.append("channels")
    return tuple(reasons)


class FitTally:
    """Counts images that did not fit the model as they were, for the warning users see: a
    640x480 colour JPEG scored by a 32x32 gray model should never pass without a word."""

    EXAMPLES = 3

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self.total = 0
        self.mismatched = 0  # images with at least one reason
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, shape: tuple[int, int, int]) -> tuple[str, ...]:
        self.total += 1
        reasons = fit_reasons(shape, self.spec)
        self.mismatched += bool(reasons)
        for reason in reasons:
            self.counts[reason] += 1
            seen = self.examples.setdefault(reason, [])
            text = f"{shape[1]}x{shape[0]}x{shape[2]}"
            if text not in seen and len(seen) < self.EXAMPLES:
                seen.append(text)
        return reasons

    def add_all(self, shapes) -> "FitTally":
        for shape in shapes:
            self.add(tuple(int(v) for v in shape))
        return self

    def message(self, what: str = "images") -> str | None:
        """One line, or None when everything fitted as it was."""
        if not self.counts:
            return None
        target = f"{self.spec.image_size}x{self.spec.image_size}x{self.spec.channels}"
        parts = [f"{self.counts[r]} {r} (e.g. {', '.join(self.examples[r])} as WxHxC)" for r in sorted(self.counts)]
        return f"{self.mismatched} of {self.total} {what} do not match the model's {target}: " + "; ".join(parts)

    @property
    def serious(self) -> bool:
        """Resizing or channel conversion changes what the model sees; padding 28x28 into 32x32 does not."""
        return bool(self.counts.get("resized") or self.counts.get("channels"))
