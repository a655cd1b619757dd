"""Turning decoded uint8 images into the model's input, identically in training and serving.

An image arrives as a uint8 array HxW or HxWxC (C = 1, 3 or 4). `fit_image` converts the
channels and then, for a whole-image model, brings it to the model size (zero-padding a smaller
image such as MNIST's 28x28 into 32x32, or resizing with antialiasing); for a patch model
(`patch_stride` > 0) it scales the image by `scale` keeping its aspect, and the image is then cut
into overlapping patches of the model size (ama_stream.tiling). `to_tensor` scales a stack of
fitted images (or patches) to [-1, 1] in NCHW layout.
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
    image_size: int = 32  # the model's input: the whole image, or one patch of a patch model
    channels: int = 1
    # auto: pad when the image is smaller than the model size and square-ish, else resize
    resize: str = "auto"
    # > 0: a patch model. Images are scaled by `scale` (aspect kept, never distorted) and scored by
    # tiling them with image_size patches at this stride; 0: the whole image is fitted to image_size
    patch_stride: int = 0
    scale: float = 1.0
    top_k: int = 1  # patch model: an image's score is the mean of its k highest patch scores
    # patch model with per-position statistics (aligned parts): the working size (height, width) every
    # image is brought to, so each patch position means the same place on the part; () = any size
    frame_size: tuple[int, ...] = ()

    @property
    def patched(self) -> bool:
        return self.patch_stride > 0

    def __post_init__(self) -> None:
        if self.patch_stride < 0 or self.patch_stride > self.image_size:
            raise ValueError(f"patch_stride must be in [0, image_size={self.image_size}], got {self.patch_stride}")
        if not (0 < self.scale <= 4) or self.scale != self.scale:
            raise ValueError(f"scale must be in (0, 4], got {self.scale}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        object.__setattr__(self, "frame_size", tuple(int(v) for v in self.frame_size))  # lists from a checkpoint
        if self.frame_size and (len(self.frame_size) != 2 or not self.patched
                                or min(self.frame_size) < self.image_size):
            raise ValueError(f"frame_size must be (height, width) of at least one patch ({self.image_size}) for a "
                             f"patch model, got {self.frame_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def to_dict(self) -> dict:
        """The keys added with patch models only when set: a whole-image model's dict (and so its
        model_id, which calibrations name) is what it was before they existed."""
        out = asdict(self)
        out["frame_size"] = list(self.frame_size)
        for key, default in _PATCH_DEFAULTS.items():
            if out[key] == default:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        return cls(**data)


_PATCH_DEFAULTS = {"patch_stride": 0, "scale": 1.0, "top_k": 1, "frame_size": []}


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


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxWxC uint8 -> height x width x C uint8, bilinear with antialiasing (PIL)."""
    mode = "L" if img.shape[2] == 1 else "RGB"
    pil = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode)
    out = np.asarray(pil.resize((width, height), resample=Image.BILINEAR, reducing_gap=None), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def scaled_size(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """A patch model's working size of an image of native height x width: scaled by spec.scale
    (aspect kept), then at least one patch in each direction (smaller images are padded)."""
    h, w = max(1, round(height * spec.scale)), max(1, round(width * spec.scale))
    return max(h, spec.image_size), max(w, spec.image_size)


def _fit_patched(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Scaled by spec.scale with the aspect kept; an image smaller than a patch is padded by repeating
    its edge pixels (zeros would be a dark frame: a defect to the model). With spec.frame_size (aligned
    parts), brought to exactly that working size instead."""
    if spec.frame_size:
        return img if img.shape[:2] == spec.frame_size else _resize(img, *spec.frame_size)
    h, w = max(1, round(img.shape[0] * spec.scale)), max(1, round(img.shape[1] * spec.scale))
    if (h, w) != img.shape[:2]:
        img = _resize(img, h, w)
    p = spec.image_size
    if h < p or w < p:
        img = np.pad(img, ((0, max(0, p - h)), (0, max(0, p - w)), (0, 0)), mode="edge")
    return img


def fit_image(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Any uint8 image -> [S, S, C] uint8 for a whole-image model; for a patch model, the image at its
    working scale [H, W, C] (see scaled_size), to be tiled (ama_stream.tiling)."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy image, got {getattr(img, 'dtype', type(img))}")
    if img.size == 0:
        raise ValueError(f"empty image of shape {img.shape}")
    img = _convert_channels(img, spec.channels)
    if spec.patched:
        return _fit_patched(img, spec)
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
    return _resize(img, s, s)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, S, S, C] uint8 -> [N, C, S, S] float32 in [-1, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, S, S, C], got {images.dtype} {images.shape}")
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return t.float().div_(127.5).sub_(1.0)


def native_shape(img: np.ndarray) -> tuple[int, int, int]:
    """(height, width, channels) of a decoded image as it arrived."""
    return (int(img.shape[0]), int(img.shape[1]), int(img.shape[2]) if img.ndim == 3 else 1)


def fit_reasons(shape: tuple[int, int, int], spec: PreprocessSpec) -> tuple[str, ...]:
    """Why an image of native (h, w, c) does not enter the model as it is: "padded" or "resized"
    (its size), and "channels" (gray <-> colour, alpha dropped)."""
    h, w, c = shape
    reasons = []
    s = spec.image_size
    if spec.patched and spec.frame_size:  # aligned parts: another size than the training images' is resized
        if (round(h * spec.scale), round(w * spec.scale)) != spec.frame_size:
            reasons.append("resized")
    elif spec.patched:  # scaling is the model's own setting, not a misfit; an image under one patch is padded
        if round(h * spec.scale) < s or round(w * spec.scale) < s:
            reasons.append("padded")
    elif (h, w) != (s, s):
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
        if self.spec.patched:
            target = f"patches of {target} at scale {self.spec.scale:g}"
        if set(self.counts) == {"padded"}:  # e.g. 28x28 digits into 32x32: intended, not a problem
            return (f"{self.counts['padded']} of {self.total} {what} padded to the model's {target} "
                    f"(e.g. {', '.join(self.examples['padded'])} as WxHxC)")
        parts = [f"{self.counts[r]} {r} (e.g. {', '.join(self.examples[r])} as WxHxC)" for r in sorted(self.counts)]
        return f"{self.mismatched} of {self.total} {what} do not match the model's {target}: " + "; ".join(parts)

    @property
    def serious(self) -> bool:
        """Resizing or channel conversion changes what the model sees; padding 28x28 into 32x32 does not."""
        return bool(self.counts.get("resized") or self.counts.get("channels"))
