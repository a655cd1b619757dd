"""Atypical selection: latent codes away from where the encoder puts normal data.

Modes:
- shell:    between the spheres of radii r and r(1 -/+ delta): a uniform direction and a radius uniform
            in that interval (radial: uniform, the paper's "uniformly between spheres"), or uniform over
            the shell's volume (radial: volume; in nz >= 64 that is nearly the outer sphere, i.e. the
            normal codes for `inward`). r = sqrt(nz) ("typical", the typical-set radius of N(0, I)),
            the batch's median ||E(x)|| ("empirical"), or a number.
- relative: the authors' code: alpha * E(x) (inward) or E(x) / alpha (outward), alpha ~ U(0, delta).
- cube:     Sipple (2020) baseline: uniform in the batch codes' bounding box widened by delta per side.
- synthetic: not codes but images: good training images with a synthetic defect implanted
            (ama_stream.defects; `synthetic_negatives`), fed to the same negative term.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ama_stream import ops
from ama_stream.defects import implant_batch

from .config import NegativesSection


def needs_codes(cfg: NegativesSection) -> bool:
    """Whether sampling looks at the batch's encodings (else only the latent size matters)."""
    return cfg.mode in ("relative", "cube") or (cfg.mode == "shell" and cfg.radius == "empirical")


def synthetic_negatives(cfg: NegativesSection, images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n pixel-space negatives, uint8 [n, S, S, C]: n of the batch's good images (drawn without
    replacement when the batch has enough), each with one synthetic defect of cfg.kinds."""
    picks = rng.choice(len(images), size=n, replace=n > len(images))
    defective, _masks = implant_batch(images[picks], tuple(cfg.kinds), cfg.size, cfg.contrast, rng)
    return defective


def shell_radii(cfg: NegativesSection, nz: int, codes: torch.Tensor | None) -> tuple[float, float]:
    if cfg.radius == "typical":
        r = math.sqrt(nz)
    elif cfg.radius == "empirical":
        assert codes is not None
        r = float(codes.norm(dim=1).median())
    else:
        r = float(cfg.radius)
    if cfg.direction == "inward":
        return max(r * (1.0 - cfg.delta), 0.0), r
    return r, r * (1.0 + cfg.delta)


def sample_negatives(cfg: NegativesSection, n: int, nz: int, codes: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """n negative codes [n, nz] on `device`. `codes`: the batch's encodings, required when needs_codes(cfg)."""
    if cfg.mode == "synthetic":
        raise ValueError("synthetic negatives are images: use synthetic_negatives")
    if needs_codes(cfg) and codes is None:
        raise ValueError(f"negatives mode {cfg.mode!r} with radius {cfg.radius!r} needs the batch's codes")
    if cfg.mode == "shell":
        r_in, r_out = shell_radii(cfg, nz, codes)
        return ops.shell_sample(n, nz, r_in, r_out, generator=generator, volume=cfg.radial == "volume").to(device)
    codes = codes.detach()
    if cfg.mode == "relative":
        idx = torch.randint(codes.shape[0], (n,), generator=generator)
        alpha = (torch.rand(n, 1, generator=generator) * cfg.delta).clamp_min(1e-3).to(codes.device)
        base = codes[idx.to(codes.device)]
        return alpha * base if cfg.direction == "inward" else base / alpha
    lo, hi = codes.min(dim=0).values, codes.max(dim=0).values
    margin = cfg.delta * (hi - lo)
    u = torch.rand(n, nz, generator=generator).to(codes.device)
    return (lo - margin) + u * (hi - lo + 2 * margin)
