"""Loads ama_stream._C (the csrc kernels) and registers the fake kernels torch.compile needs.

DEVICES is the set of device types with compiled kernels (empty when _C did not load); LOAD_ERROR
says why it did not load.
"""
from __future__ import annotations

import torch

OPS = ("pair_rscore", "pair_rscore_features", "pair_rscore_map", "shell_sample")


def _load() -> tuple[frozenset[str], str | None]:
    try:
        import ama_stream._C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)
    except ImportError as exc:  # not built (CPU-only install without a compiler) or not loadable
        return frozenset(), f"{type(exc).__name__}: {exc}"
    def has_kernel(op: str, key: str) -> bool:
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"ama::{op}", key)
        except RuntimeError:  # an _C built before the op existed: the op is unknown to the dispatcher
            return False

    missing = [op for op in OPS if not has_kernel(op, "CPU") and not has_kernel(op, "CUDA")]
    if missing:
        return frozenset(), f"ama_stream._C lacks {', '.join(missing)} (built from older sources: rebuild it)"
    devices = {dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if all(has_kernel(op, key) for op in OPS)}
    return frozenset(devices), None


DEVICES, LOAD_ERROR = _load()


def _register_fakes() -> None:
    """Shape-only kernels: output shapes and dtypes from the input's metadata, no data touched."""

    def r_output(h: torch.Tensor) -> torch.Tensor:
        torch._check(h.dim() == 4, lambda: f"pair_rscore: h must be 4-D [2B, C, H, W], got {h.dim()}-D")
        torch._check(h.shape[0] % 2 == 0, lambda: f"pair_rscore: h's first dimension must be even, got {h.shape[0]}")
        return h.new_empty((h.shape[0] // 2,), dtype=torch.float32)

    @torch.library.register_fake("ama::pair_rscore")
    def _pair_rscore_fake(h):
        return r_output(h)

    @torch.library.register_fake("ama::pair_rscore_features")
    def _pair_rscore_features_fake(h):
        return r_output(h), h.new_empty((h.shape[0], h.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("ama::pair_rscore_map")
    def _pair_rscore_map_fake(h):
        return r_output(h), h.new_empty((h.shape[0] // 2, h.shape[2], h.shape[3]), dtype=torch.float32)

    @torch.library.register_fake("ama::shell_sample")
    def _shell_sample_fake(n, d, r_inner, r_outer, *, volume=False, generator=None, device=None):
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        return torch.empty((n, d), dtype=torch.float32, device=device)


if LOAD_ERROR is None:
    _register_fakes()
