"""Python face of the csrc ops. Uses ama_stream._C when it loaded, the pure-PyTorch twins otherwise."""
from __future__ import annotations

from .reference import pair_rscore_reference, shell_sample_reference


def backend() -> str:
    return "reference"


def pair_rscore(h, mu, sigma):
    return pair_rscore_reference(h, float(mu), float(sigma))


def shell_sample(n, d, r_inner, r_outer, generator=None, device="cpu"):
    return shell_sample_reference(n, d, r_inner, r_outer, generator=generator, device=device)


__all__ = ["backend", "pair_rscore", "shell_sample", "pair_rscore_reference", "shell_sample_reference"]
