"""Which backend ama_stream.ops uses, the fallback to the twins, and the portable CPU kernel path.

CI sets AMA_REQUIRE_COMPILED=1 (or =cuda where the CUDA sources are built) so that a missing
ama_stream._C fails here instead of silently running the twins.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ama_stream import ops
from ama_stream.ops import _compiled
from ops_support import compiled_required


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return result


def test_required_compiled_backend_is_present() -> None:
    required = compiled_required()
    if required is None:
        pytest.skip("AMA_REQUIRE_COMPILED not set")
    assert _compiled.LOAD_ERROR is None, f"ama_stream._C did not load: {_compiled.LOAD_ERROR}"
    assert "cpu" in _compiled.DEVICES and ops.backend() == "compiled" and ops.backend("cpu") == "compiled"
    if required == "cuda":
        assert "cuda" in _compiled.DEVICES, "ama_stream._C was built without its CUDA kernels"


def test_backend_names() -> None:
    expected = "compiled" if _compiled.DEVICES else "reference"
    assert ops.backend() == expected
    assert ops.backend("meta") == "reference"
    assert ops.backend(torch.device("cpu")) == ("compiled" if "cpu" in _compiled.DEVICES else "reference")


def test_backend_logged_once_at_import() -> None:
    result = run_python(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
        import ama_stream.ops as o
        import ama_stream.ops
        print(o.backend())
        """
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("ama_stream.ops backend:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].split()[2] == result.stdout.strip() == ops.backend()


def test_falls_back_to_twins_without_extension() -> None:
    result = run_python(
        """
        import importlib.abc, logging, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ama_stream._C":
                    raise ImportError("blocked by the test")
        sys.meta_path.insert(0, Block())
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
        import torch
        import ama_stream.ops as o
        h = torch.randn(6, 4, 3, 3)
        for a, b in zip(o.pair_rscore(h, return_features=True), o.pair_rscore_reference(h, return_features=True)):
            assert torch.equal(a, b)
        torch.manual_seed(3)
        s = o.shell_sample(5, 7, 1.0, 2.0)
        torch.manual_seed(3)
        assert torch.equal(s, o.shell_sample_reference(5, 7, 1.0, 2.0))
        assert "ama_stream._C" not in sys.modules
        print(o.backend())
        """
    )
    assert result.stdout.strip() == "reference"
    assert "backend: reference" in result.stderr and "blocked by the test" in result.stderr


def test_portable_cpu_kernels_match_twin() -> None:
    """ATEN_CPU_CAPABILITY=default turns the AVX2 row sums off: the portable loops must agree too."""
    if "cpu" not in _compiled.DEVICES:
        pytest.skip("no compiled CPU kernels")
    run_python(
        """
        import torch
        from ama_stream.ops.reference import pair_rscore_reference
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        for shape in [(2, 3, 5, 7), (18, 129, 8, 8), (4, 17, 1, 1), (2, 256, 16, 16)]:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                h = torch.randn(shape).to(dtype)
                for x in (h, h.to(memory_format=torch.channels_last)):
                    got = torch.ops.ama.pair_rscore_features(x)
                    want = pair_rscore_reference(x, return_features=True)
                    for a, b in zip(got, want):
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
        """,
        ATEN_CPU_CAPABILITY="default",
    )
