"""Argument checks shared by the public ops and their pure-PyTorch twins.

The messages match the C++ checks in csrc/ops_common.h word for word where both exist, so a bad
input reads the same whichever backend runs. ValueError for bad values, TypeError for bad types.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

RSCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_pair_rscore_args(h: torch.Tensor) -> None:
    """Validates h [2B, C, H, W] of a dtype the kernels read."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"pair_rscore: h must be a tensor, got {type(h).__name__}")
    if h.dim() != 4:
        raise ValueError(f"pair_rscore: h must be 4-D [2B, C, H, W], got {h.dim()}-D shape {list(h.shape)}")
    if h.shape[0] % 2:
        raise ValueError(
            f"pair_rscore: h's first dimension must be even (B (x, x) rows then B (x, x_hat) rows), got {h.shape[0]}"
        )
    if h.dtype not in RSCORE_DTYPES:
        raise TypeError(f"pair_rscore: h must be float32, float16 or bfloat16, got {h.dtype}")


def _integer(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"shell_sample: {name} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"shell_sample: {name} must be an integer, got {type(value).__name__}") from None


def check_shell_sample_args(n, d, r_inner, r_outer) -> tuple[int, int, float, float]:
    """Validates the sampler's sizes and radii; returns them as int, int, float, float."""
    n, d = _integer("n", n), _integer("d", d)
    if n < 0:
        raise ValueError(f"shell_sample: n must be >= 0, got {n}")
    if d < 1:
        raise ValueError(f"shell_sample: d must be >= 1, got {d}")
    for name, value in (("r_inner", r_inner), ("r_outer", r_outer)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"shell_sample: {name} must be a real number, got {type(value).__name__}")
    r_inner, r_outer = float(r_inner), float(r_outer)
    if not (math.isfinite(r_inner) and math.isfinite(r_outer)):
        raise ValueError(f"shell_sample: r_inner and r_outer must be finite, got r_inner={r_inner} r_outer={r_outer}")
    if r_inner < 0:
        raise ValueError(f"shell_sample: r_inner must be >= 0, got {r_inner}")
    if r_inner > r_outer:
        raise ValueError(f"shell_sample: r_inner must be <= r_outer, got r_inner={r_inner} r_outer={r_outer}")
    return n, d, r_inner, r_outer


def resolve_sample_device(generator: torch.Generator | None, device: str | torch.device | None) -> torch.device:
    """The sampler's output device: `device`, else the generator's device, else the CPU.

    A generator and a device that disagree are an error, as in the compiled op.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"shell_sample: generator must be a torch.Generator, got {type(generator).__name__}")
    try:
        target = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"shell_sample: invalid device {device!r}: {exc}") from None
    if generator is None:
        return target if target is not None else torch.device("cpu")
    gen_device = generator.device
    if target is None:
        return gen_device
    same_index = target.index is None or gen_device.index is None or target.index == gen_device.index
    if target.type != gen_device.type or not same_index:
        raise ValueError(
            f"shell_sample: generator is on {gen_device} but device is {target} "
            "(generator and output must be on the same device)"
        )
    return target if target.index is not None else gen_device
