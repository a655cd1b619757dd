"""Shared by the compiled-op tests: the device parameters and the compiled-or-skip rule.

CI sets AMA_REQUIRE_COMPILED (1/cpu/cuda) so that missing kernels fail instead of skipping.
"""
from __future__ import annotations

import os

import pytest
import torch

from ama_stream.ops import _compiled

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])
DEVICES = ["cpu", CUDA]


def compiled_required() -> str | None:
    """The AMA_REQUIRE_COMPILED level ('1', 'cpu', 'cuda', ...) when it is set, else None."""
    required = os.environ.get("AMA_REQUIRE_COMPILED", "").strip().lower()
    return required if required in ("1", "true", "yes", "cpu", "cuda") else None


def require_compiled(device: str) -> None:
    """Skip when the compiled kernels for `device` are absent, unless AMA_REQUIRE_COMPILED says they must be there."""
    if device in _compiled.DEVICES:
        return
    required = compiled_required()
    if required:
        pytest.fail(f"AMA_REQUIRE_COMPILED={required} but ama_stream._C has no {device} kernels ({_compiled.LOAD_ERROR})")
    pytest.skip(f"ama_stream._C has no {device} kernels ({_compiled.LOAD_ERROR})")
