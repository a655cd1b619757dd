"""Pure-PyTorch twins of the compiled ops: the fallback where ama_stream._C has no kernel, and the
test oracle. Same signatures, same checks and error messages as the compiled path."""
from __future__ import annotations

import math

import torch

from .checks import check_pair_rscore_args, check_shell_sample_args, resolve_sample_device

def pair_rscore_reference(h: torch.Tensor, *, return_features: bool = False):
    """R-score tail of the mirrored critic (paper eq. 5).

    h [2B, C, H, W] (first B rows (x, x), last B rows (x, x_hat)), any floating layout ->
    R = ||f(x, x) - f(x, x_hat)||_1 with f = sum_hw ReLU(h), [B] float32; with `return_features`
    (R, f) with f [2B, C] float32. Differentiable with respect to h. Only R: z and log A under a
    fitted Gaussian are the calibration's (ama_stream.calibration).
    """
    check_pair_rscore_args(h)
    f = torch.relu(h.float()).sum(dim=(2, 3))
    b = f.shape[0] // 2
    r = (f[:b] - f[b:]).abs().sum(dim=1)
    return (r, f) if return_features else r


def pair_rscore_map_reference(h: torch.Tensor):
    """R and the anomaly map of the mirrored critic in one pass over h.

    h [2B, C, H, W] as for pair_rscore -> (R [B] float32, map [B, H, W] float32) with
    map[b, y, x] = sum_c |ReLU(h[b, c, y, x]) - ReLU(h[B + b, c, y, x])|: the per-position L1
    difference of the features before the sum-pool (R compares them after it, so R <= map.sum()).
    """
    check_pair_rscore_args(h)
    a = torch.relu(h.float())
    b = a.shape[0] // 2
    r = (a[:b].sum(dim=(2, 3)) - a[b:].sum(dim=(2, 3))).abs().sum(dim=1)
    return r, (a[:b] - a[b:]).abs().sum(dim=1)


def shell_sample_reference(
    n: int,
    d: int,
    r_inner: float,
    r_outer: float,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    volume: bool = False,
) -> torch.Tensor:
    """n points of the shell between spheres of radii r_inner <= r_outer in R^d, [n, d] float32.

    Direction: a normalised Gaussian. Radius: uniform on [r_in, r_out] (the paper's "uniformly
    between spheres"), or with `volume` uniform over the shell's volume: r^d uniform on
    [r_in^d, r_out^d], i.e. r = r_out * (q + u (1 - q))^(1/d) with q = (r_in / r_out)^d and
    u ~ U(0, 1], evaluated in log space so that d = 512 neither overflows nor underflows. Output
    device: `device`, else the generator's, else the CPU; draws from `generator` or that device's
    default generator.
    """
    n, d, r_inner, r_outer = check_shell_sample_args(n, d, r_inner, r_outer)
    device = resolve_sample_device(generator, device)
    direction = torch.randn(n, d, generator=generator, device=device)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if r_outer == 0:
        return direction * 0.0
    u = 1.0 - torch.rand(n, generator=generator, device=device, dtype=torch.float64)  # (0, 1]: finite log
    if volume:
        q = math.exp(d * (math.log(r_inner) - math.log(r_outer))) if r_inner > 0 else 0.0  # underflows to 0 harmlessly
        radius = torch.exp(math.log(r_outer) + torch.log(q + u * (1.0 - q)) / d)
    else:
        radius = r_inner + u * (r_outer - r_inner)
    return direction * radius.clamp(r_inner, r_outer).float().unsqueeze(1)
