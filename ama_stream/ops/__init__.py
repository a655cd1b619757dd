"""Python face of the csrc ops (`ama_stream._C`, registered as torch.ops.ama.*).

Each public op runs the compiled kernel when ama_stream._C has one for the input's device type,
and its pure-PyTorch twin (ops/reference.py) otherwise; `backend()` says which. The compiled
kernels are inference kernels: when autograd is recording through `h`, pair_rscore runs the
(differentiable) twin. pair_rscore returns R only (and the pooled features when asked): the score
math under a fitted Gaussian (z, log A, p-values, decisions) has one owner, ama_stream.calibration.
"""
from __future__ import annotations

import logging

import torch

from . import _compiled
from .checks import check_pair_rscore_args, check_shell_sample_args, resolve_sample_device
from .reference import pair_rscore_map_reference, pair_rscore_reference, shell_sample_reference

log = logging.getLogger(__name__)


def backend(device: str | torch.device | None = None) -> str:
    """'compiled' when ama_stream._C loaded (and, given a device, has kernels for its type), else 'reference'."""
    if device is None:
        return "compiled" if _compiled.DEVICES else "reference"
    return "compiled" if torch.device(device).type in _compiled.DEVICES else "reference"


def pair_rscore(h: torch.Tensor, *, return_features: bool = False):
    """h [2B, C, H, W] float32/float16/bfloat16 (first B rows (x, x), last B rows (x, x_hat)) ->
    R [B] float32, or (R, f) with the pooled features f [2B, C] float32 under `return_features`.

    R = ||f(x, x) - f(x, x_hat)||_1, f = sum_hw ReLU(h) (paper eq. 5). Contiguous and channels_last
    inputs are read in place. z, log A and decisions are not computed here: the Calibration
    (ama_stream.calibration) owns mu/sigma and turns R into them.
    """
    check_pair_rscore_args(h)
    grad = h.requires_grad and torch.is_grad_enabled()
    if h.device.type not in _compiled.DEVICES or grad:
        return pair_rscore_reference(h, return_features=return_features)
    if return_features:
        return torch.ops.ama.pair_rscore_features(h)
    return torch.ops.ama.pair_rscore(h)


def pair_rscore_map(h: torch.Tensor):
    """h [2B, C, H, W] as for pair_rscore -> (R [B] float32, map [B, H, W] float32), one pass over h:
    map[b] = sum_c |ReLU(h_(x,x)) - ReLU(h_(x,x_hat))| per position (the anomaly map before the
    sum-pool), R exactly as pair_rscore. Inference op: under autograd the twin runs."""
    check_pair_rscore_args(h)
    grad = h.requires_grad and torch.is_grad_enabled()
    if h.device.type not in _compiled.DEVICES or grad:
        return pair_rscore_map_reference(h)
    return torch.ops.ama.pair_rscore_map(h)


def shell_sample(
    n: int,
    d: int,
    r_inner: float,
    r_outer: float,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    volume: bool = False,
) -> torch.Tensor:
    """n points of the shell between the spheres of radii r_inner <= r_outer in R^d, [n, d] float32:
    a uniform direction and a radius uniform in [r_inner, r_outer] (the paper's law), or with
    `volume` uniform over the shell's volume (in d >= 64 nearly all on the outer sphere).

    The output lives on `device`, else on the generator's device, else on the CPU (a generator and
    a device that disagree are an error). Draws come from `generator`, else from that device's
    default generator (seeded by torch.manual_seed): the same seed gives the same samples. The
    compiled kernels and the twin are statistically equivalent, not bit-identical.
    """
    n, d, r_inner, r_outer = check_shell_sample_args(n, d, r_inner, r_outer)
    if not isinstance(volume, bool):
        raise TypeError(f"shell_sample: volume must be a bool, got {type(volume).__name__}")
    target = resolve_sample_device(generator, device)
    if target.type not in _compiled.DEVICES:
        return shell_sample_reference(n, d, r_inner, r_outer, generator=generator, device=target, volume=volume)
    return torch.ops.ama.shell_sample(n, d, r_inner, r_outer, volume=volume, generator=generator, device=target)


if _compiled.LOAD_ERROR is None:
    log.info("backend: compiled (ama_stream._C, kernels for %s)", ", ".join(sorted(_compiled.DEVICES)))
else:
    log.info("backend: reference (pure PyTorch; ama_stream._C not loaded: %s)", _compiled.LOAD_ERROR)

__all__ = ["backend", "pair_rscore", "pair_rscore_map", "shell_sample", "pair_rscore_reference",
           "pair_rscore_map_reference", "shell_sample_reference"]
