"""Synthetic defects implanted into good images.

A model trained on good images only can still learn from defects made up from them: CutPaste (Li
et al. 2021) pastes a patch of one good image elsewhere; DRAEM (Zavrtanik et al. 2021) blends a
texture into a region shaped by thresholded Perlin noise. Here they are the pixel-space negatives
of training (loss.negatives.mode: synthetic) and the probes of a label-free sensitivity check.

Kinds, each at a size (its extent in pixels) and a contrast (in [0, 1]: the share of the full
intensity range the defect moves the pixels by, or the opacity of a blend):

    spot      a filled ellipse, darker or brighter (pitting, holes, stains)
    scratch   a thin curved line, darker or brighter
    cutpaste  a rectangle cut from a donor good image (or elsewhere in the same one), possibly
              rotated or mirrored, its brightness shifted by the contrast, pasted at a new place
    blend     a Perlin-noise-shaped region where a donor's texture (or noise) shows through

`implant` returns the defective image and its mask (True where pixels changed, always inside the
image); every draw comes from the generator passed in, so results are reproducible per seed.
"""
from __future__ import annotations

import math

import numpy as np

KINDS = ("spot", "scratch", "cutpaste", "blend")


def perlin_noise(height: int, width: int, cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise, float32 [height, width] in about [-1, 1], with `cells` (rows,
    columns) of random unit gradients across the image."""
    cy, cx = max(1, cells[0]), max(1, cells[1])
    angles = rng.uniform(0, 2 * math.pi, (cy + 1, cx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, cy, height, endpoint=False)[:, None]
    x = np.linspace(0, cx, width, endpoint=False)[None, :]
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - y0, x - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grad[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (math.sqrt(2) * (top * (1 - uy) + bottom * uy)).astype(np.float32)


def _centre(height: int, width: int, extent_y: float, extent_x: float, rng: np.random.Generator) -> tuple[float, float]:
    """A centre such that a shape of the given half-extents lies inside the image (the middle when it cannot)."""
    def pick(length: int, half: float) -> float:
        lo, hi = half, length - 1 - half
        return rng.uniform(lo, hi) if hi > lo else (length - 1) / 2

    return pick(height, extent_y), pick(width, extent_x)


def _window(height: int, width: int, cy: float, cx: float, reach: float):
    """The pixel grid (yy, xx) of the box within `reach` of (cy, cx), clipped to the image, and its slices."""
    y0, y1 = max(0, int(cy - reach - 2)), min(height, int(cy + reach + 3))
    x0, x1 = max(0, int(cx - reach - 2)), min(width, int(cx + reach + 3))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return yy, xx, (slice(y0, y1), slice(x0, x1))


def _ellipse(height: int, width: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """A soft-edged filled ellipse of diameter ~size (aspect 0.5-1, any angle), values in [0, 1]."""
    a = max(size / 2, 0.75)
    b = max(a * rng.uniform(0.5, 1.0), 0.75)
    cy, cx = _centre(height, width, a, a, rng)
    theta = rng.uniform(0, math.pi)
    yy, xx, box = _window(height, width, cy, cx, a)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
    r = np.sqrt(u * u + v * v)
    edge = 1.0 / max(a, 1.0)  # about one pixel of soft edge
    alpha = np.zeros((height, width), np.float32)
    alpha[box] = np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)
    return alpha


def _curve(height: int, width: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """A thin curved line of length ~size (a quadratic Bezier), 1-2 px wide, values in [0, 1]."""
    half = max(size / 2, 1.0)
    cy, cx = _centre(height, width, half, half, rng)
    angle = rng.uniform(0, math.pi)
    d = np.array([math.sin(angle), math.cos(angle)]) * half
    p0, p2 = np.array([cy, cx]) - d, np.array([cy, cx]) + d
    p1 = np.array([cy, cx]) + rng.uniform(-0.3, 0.3) * np.array([-d[1], d[0]])
    t = np.linspace(0, 1, max(8, int(2 * size)))[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t * t * p2
    line_width = 1.0 if size < 24 else 1.5
    yy, xx, box = _window(height, width, cy, cx, half)
    dist = np.full(yy.shape, np.inf, np.float32)
    for y, x in points:
        dist = np.minimum(dist, np.hypot(yy - y, xx - x))
    alpha = np.zeros((height, width), np.float32)
    alpha[box] = np.clip(line_width - dist + 0.5, 0.0, 1.0)
    return alpha


def _shifted(values: np.ndarray, contrast: float, rng: np.random.Generator) -> np.ndarray:
    """values moved by contrast x 255, darker or brighter (away from the nearer end when that leaves room)."""
    mean = float(values.mean())
    sign = -1.0 if (mean > 127.5) == (rng.random() < 0.75) else 1.0  # mostly towards the far end
    return values + sign * contrast * 255.0


def implant(image: np.ndarray, kind: str, size: float, contrast: float, rng: np.random.Generator,
            donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image with one synthetic defect, its mask bool [H, W]); `image` uint8 HxWxC is not modified.

    `size`: the defect's extent in pixels (clipped to the image); `contrast` in (0, 1]; `donor`: a
    good image (HxWxC, any size >= the cut) for cutpaste and blend, else the image itself / noise."""
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(KINDS)}")
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 HxWxC image, got {image.dtype} {image.shape}")
    if not (0 < contrast <= 1) or not size > 0:
        raise ValueError(f"size must be > 0 and contrast in (0, 1], got size={size} contrast={contrast}")
    h, w, _ = image.shape
    size = float(min(size, h, w))
    img = image.astype(np.float32)
    if kind in ("spot", "scratch"):
        alpha = (_ellipse if kind == "spot" else _curve)(h, w, size, rng)[..., None]
        target = _shifted(img, contrast, rng)
        out = img * (1 - alpha) + target * alpha
    elif kind == "cutpaste":
        out, alpha = _cutpaste(img, size, contrast, rng, donor)
    else:
        out, alpha = _blend(img, size, contrast, rng, donor)
    result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    mask = np.any(result != image, axis=2) & (alpha[..., 0] > 0)
    return result, mask


def _cutpaste(img: np.ndarray, size: float, contrast: float, rng: np.random.Generator,
              donor: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, c = img.shape
    ph = max(1, min(h, int(round(size))))
    pw = max(1, min(w, int(round(size * rng.uniform(0.5, 1.0)))))
    source = img if donor is None else donor.astype(np.float32)[..., :c] if donor.shape[2] >= c else \
        np.repeat(donor.astype(np.float32), c, axis=2)
    sh, sw = source.shape[:2]
    ph, pw = min(ph, sh), min(pw, sw)
    sy, sx = rng.integers(0, sh - ph + 1), rng.integers(0, sw - pw + 1)
    piece = source[sy:sy + ph, sx:sx + pw].copy()
    if rng.random() < 0.5:
        piece = piece[:, ::-1]
    if rng.random() < 0.5:
        piece = piece[::-1]
    piece = _shifted(piece, contrast * rng.uniform(0.5, 1.0), rng)
    y, x = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out = img.copy()
    out[y:y + ph, x:x + pw] = piece
    alpha = np.zeros((h, w, 1), np.float32)
    alpha[y:y + ph, x:x + pw] = 1
    return out, alpha


def _blend(img: np.ndarray, size: float, contrast: float, rng: np.random.Generator,
           donor: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, c = img.shape
    cells = (max(1, round(h / max(size, 2))), max(1, round(w / max(size, 2))))
    noise = perlin_noise(h, w, cells, rng)
    region = _ellipse(h, w, size * 1.5, rng)
    shape = ((noise > 0.2) * region)[..., None].astype(np.float32)
    if not shape.any():  # the noise missed the region: keep a defect all the same
        shape = (region > 0.5)[..., None].astype(np.float32)
    if donor is not None:
        texture = donor.astype(np.float32)
        texture = texture[..., :c] if texture.shape[2] >= c else np.repeat(texture, c, axis=2)
        ty, tx = rng.integers(0, max(1, texture.shape[0] - h + 1)), rng.integers(0, max(1, texture.shape[1] - w + 1))
        texture = np.resize(texture[ty:ty + h, tx:tx + w], (h, w, c))
        texture = _shifted(texture, contrast * 0.5, rng)
    else:
        texture = rng.uniform(0, 255, (h, w, c)).astype(np.float32)
    opacity = 0.3 + 0.7 * contrast
    alpha = shape * opacity
    return img * (1 - alpha) + texture * alpha, shape


def implant_batch(images: np.ndarray, kinds: tuple[str, ...], size_range: tuple[float, float],
                  contrast_range: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One defect per image of uint8 [n, H, W, C]: a kind drawn from `kinds`, size and contrast
    log-uniform / uniform in their ranges, donors the batch's other images. Returns (images, masks)."""
    out = np.empty_like(images)
    masks = np.zeros(images.shape[:3], bool)
    n = len(images)
    for i in range(n):
        kind = kinds[rng.integers(len(kinds))]
        size = math.exp(rng.uniform(math.log(size_range[0]), math.log(size_range[1])))
        contrast = rng.uniform(*contrast_range)
        donor = images[(i + 1 + rng.integers(max(1, n - 1))) % n] if n > 1 else None
        out[i], masks[i] = implant(images[i], kind, size, contrast, rng, donor)
    return out, masks
