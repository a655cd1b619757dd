"""Scorer backends that run the exported scoring graph (ama_stream.export) with ONNX Runtime or OpenVINO.

    session = open_runtime("onnxruntime", checkpoint, export=lambda: onnx_proto(checkpoint))  # exported in memory
    session = open_runtime("openvino", checkpoint, "model.xml")        # or runs an exported file (.onnx/.xml)
    r, features = session.run(x)                                       # x: the graph's input as numpy

CPU only. A graph file must carry the metadata `ama-stream export` writes and belong to the
checkpoint (same model_id); its input kind (float [B, C, S, S] or uint8 [B, S, S, C]) is read from it.
Threads: `threads` (default: torch's thread count, so every runtime gets the same CPUs). OpenVINO
runs in float32 (INFERENCE_PRECISION_HINT f32: on CPUs with bfloat16 units it would otherwise
default to bfloat16 and R would drift); an INT8-quantized graph still runs its INT8 kernels.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

GRAPH_FORMAT = "ama-stream/score-graph"  # the metadata mark of a graph written by ama_stream.export

if TYPE_CHECKING:  # torch and the exporter load on first use: the CLI's parsers import this module
    import torch

    from .checkpoint import Checkpoint

RUNTIMES = ("torch", "onnxruntime", "openvino")
GRAPH_RUNTIMES = RUNTIMES[1:]
EXPORT_FORMATS = ("onnx", "openvino")
INPUT_KINDS = ("float", "uint8")
# which pip extra brings which package
EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "openvino": "openvino"}


class RuntimeUnavailable(RuntimeError):
    """An optional runtime or exporter package is not installed (the message names the pip extra)."""


def require(module: str, what: str):
    """Imports an optional package or raises RuntimeUnavailable naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0], module)
        raise RuntimeUnavailable(
            f"{what} needs the package {module.split('.')[0]}, which is not installed or does not load "
            f"({type(exc).__name__}: {exc}); install it with: pip install 'ama-stream[{extra}]'") from None


def add_runtime_options(parser) -> None:
    """--runtime and --runtime-model, the same on every command that scores offline (calibrate, evaluate)."""
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="scoring runtime: torch (default), or onnxruntime / openvino on the CPU (the exported "
                             "graph; extras ama-stream[onnx] / [openvino])")
    parser.add_argument("--runtime-model", metavar="FILE",
                        help="with --runtime onnxruntime/openvino: a graph written by ama-stream export (default: "
                             "export the checkpoint's graph in memory)")


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    return runtime


class GraphSession:
    """One loaded graph: `run(x)` -> (r [B] float32, features [2B, W] float32) as numpy arrays."""

    runtime = ""

    def __init__(self, metadata: dict[str, str], origin: str):
        self.metadata = metadata
        self.origin = origin
        self.input_kind = metadata.get("input", "float")
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"{origin}: unknown graph input kind {self.input_kind!r}")

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def feed(self, x: torch.Tensor) -> np.ndarray:
        """Model input [B, C, S, S] in [-1, 1] -> what this graph takes (the uint8 inverse of to_tensor)."""
        import torch

        x = x.detach().to("cpu", torch.float32)
        if self.input_kind == "uint8":
            return ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        return x.contiguous().numpy()


def _check_metadata(metadata: dict[str, str], checkpoint: Checkpoint, origin: str) -> None:
    if metadata.get("format") != GRAPH_FORMAT:
        raise ValueError(f"{origin}: not an ama-stream scoring graph (no {GRAPH_FORMAT!r} metadata; "
                         "write it with ama-stream export)")
    if metadata.get("model_id") != checkpoint.model_id:
        raise ValueError(f"{origin}: exported from model {metadata.get('model_id')}, not from this checkpoint's model "
                         f"{checkpoint.model_id}; export it again with ama-stream export --checkpoint")
    spec = checkpoint.preprocess
    if (metadata.get("image_size"), metadata.get("channels")) != (str(spec.image_size), str(spec.channels)):
        raise ValueError(f"{origin}: graph is for {metadata.get('image_size')}x{metadata.get('image_size')} images with "
                         f"{metadata.get('channels')} channels, the checkpoint for {spec.image_size}x{spec.image_size} "
                         f"with {spec.channels}")


def _onnx_metadata(path: Path) -> dict[str, str]:
    onnx = require("onnx", "reading an ONNX graph's metadata")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    return {p.key.removeprefix("ama_stream."): p.value for p in proto.metadata_props if p.key.startswith("ama_stream.")}


def _threads(threads: int | None) -> int:
    import torch

    return max(1, int(threads if threads is not None else torch.get_num_threads()))


class OnnxRuntimeSession(GraphSession):
    runtime = "onnxruntime"

    def __init__(self, model: bytes | Path, metadata: dict[str, str], origin: str, threads: int | None = None):
        super().__init__(metadata, origin)
        ort = require("onnxruntime", "runtime onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, f = self.session.run(["r", "features"], {"images": x})
        return r, f


class OpenVinoSession(GraphSession):
    runtime = "openvino"

    def __init__(self, model, metadata: dict[str, str], origin: str, threads: int | None = None):
        super().__init__(metadata, origin)
        ov = require("openvino", "runtime openvino")
        core = ov.Core()
        if isinstance(model, (str, Path)):
            model = core.read_model(str(model))
        config = {"INFERENCE_NUM_THREADS": _threads(threads), "INFERENCE_PRECISION_HINT": "f32",
                  "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._r, self._f = self.compiled.output("r"), self.compiled.output("features")

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.request.infer({0: x}, share_outputs=False)  # copies: the next call reuses the buffers
        return np.asarray(out[self._r]), np.asarray(out[self._f])


def _openvino_ir_metadata(model) -> dict[str, str]:
    meta = {}
    for key in ("format", "version", "model_id", "input", "image_size", "channels", "quantized"):
        if model.has_rt_info(["ama_stream", key]):
            meta[key] = model.get_rt_info(["ama_stream", key]).astype(str)
    return meta


def open_runtime(runtime: str, checkpoint: Checkpoint, model_file: str | os.PathLike | None = None,
                 threads: int | None = None, export=None) -> GraphSession:
    """A session of `runtime` for the checkpoint: its exported graph from `model_file` (.onnx, or .xml
    for openvino), else `export()` -> the ONNX ModelProto made now in memory (ama_stream.export)."""
    check_runtime(runtime)
    if runtime == "torch":
        raise ValueError("the torch runtime runs the checkpoint itself, not an exported graph")
    # the runtime's own package first: a missing runtime is the first thing to say
    require("onnxruntime" if runtime == "onnxruntime" else "openvino", f"runtime {runtime}")
    if model_file is None:
        if export is None:
            raise ValueError("no runtime model file and nothing to export one with")
        proto = export()
        meta = {p.key.removeprefix("ama_stream."): p.value for p in proto.metadata_props}
        origin = f"graph exported from {checkpoint.model_id}"
        if runtime == "onnxruntime":
            return OnnxRuntimeSession(proto.SerializeToString(), meta, origin, threads)
        with tempfile.TemporaryDirectory() as tmp:  # OpenVINO reads the ONNX file, then holds the model
            path = Path(tmp) / "graph.onnx"
            path.write_bytes(proto.SerializeToString())
            ov = require("openvino", "runtime openvino")
            return OpenVinoSession(ov.Core().read_model(str(path)), meta, origin, threads)
    path = Path(model_file)
    if not path.is_file():
        raise ValueError(f"runtime model {path}: no such file")
    if path.suffix == ".xml":
        if runtime != "openvino":
            raise ValueError(f"runtime model {path}: an OpenVINO IR (.xml) runs with --runtime openvino, not {runtime}")
        ov = require("openvino", "runtime openvino")
        model = ov.Core().read_model(str(path))
        meta = _openvino_ir_metadata(model)
        _check_metadata(meta, checkpoint, str(path))
        return OpenVinoSession(model, meta, str(path), threads)
    meta = _onnx_metadata(path)
    _check_metadata(meta, checkpoint, str(path))
    if runtime == "onnxruntime":
        return OnnxRuntimeSession(path, meta, str(path), threads)
    return OpenVinoSession(path, meta, str(path), threads)
