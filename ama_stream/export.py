"""The scoring graph in one file for ONNX Runtime and OpenVINO: images -> R (and the pooled features).

    export_model("model.pt", "onnx", "model.onnx")             # what `ama-stream export` runs
    export_model("model.pt", "openvino", "model.xml")          # OpenVINO IR: model.xml + model.bin

The graph is E, G and the critic with the R tail (paper eq. 5) as ONE graph with a dynamic batch
axis, traced from the same modules the torch Scorer runs (spectral norm baked in, eval-mode BN):

    input  images  float32 [B, C, S, S] in [-1, 1] (the Scorer's model input, `input_kind="float"`)
                   or uint8 [B, S, S, C] images already fitted to the model size (`input_kind="uint8"`;
                   the graph scales them as ama_stream.preprocess.to_tensor does)
    output r       float32 [B]        R-scores
           features float32 [2B, W]   the critic's sum-pooled features f, (x, x) rows then (x, x_hat) rows

Only R: z, log A and decisions come from a Calibration, as for the torch Scorer. For a checkpoint
trained with `score: mahalanobis` the graph is the same; the Scorer that runs it turns the features
into the model's score (ama_stream.feature_gaussian), so read `r` there as R, not the model's score. The file carries
metadata (ONNX metadata_props / OpenVINO rt_info "ama_stream"): format, version, model_id (the
checkpoint's), input kind, image size and channels, so a Scorer refuses a graph of another model.
ONNX goes through `torch.onnx.export` (the dynamo exporter: packages onnx and onnxscript); the
OpenVINO IR is converted from that ONNX graph (package openvino), so both runtimes run one graph.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import feature_gaussian
from .checkpoint import Checkpoint, load_checkpoint
from .model import AMA, bake_spectral_norm
from .ops import pair_rscore_reference
from .runtimes import EXPORT_FORMATS, GRAPH_FORMAT, INPUT_KINDS, RuntimeUnavailable, require  # noqa: F401

GRAPH_VERSION = 1
OPSET = 18


class ScoreGraph(nn.Module):
    """images -> (r [B], features [2B, W]): the torch Scorer's computation as one traceable module."""

    def __init__(self, model: AMA, input_kind: str = "float"):
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")
        self.model = model
        self.input_kind = input_kind

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_kind == "uint8":  # [B, S, S, C] uint8 -> [B, C, S, S] in [-1, 1], as preprocess.to_tensor
            x = images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        else:
            x = images
        return pair_rscore_reference(self.model.critic_map(x), return_features=True)


def score_graph(checkpoint: Checkpoint, input_kind: str = "float") -> ScoreGraph:
    """The checkpoint's ScoreGraph on the CPU, eval mode, spectral norm baked in."""
    model = checkpoint.build_model("cpu")
    with torch.no_grad():
        bake_spectral_norm(model)
    return ScoreGraph(model.eval(), input_kind).eval()


def graph_metadata(checkpoint: Checkpoint, input_kind: str) -> dict[str, str]:
    spec = checkpoint.preprocess
    return {"format": GRAPH_FORMAT, "version": str(GRAPH_VERSION), "model_id": checkpoint.model_id,
            "input": input_kind, "image_size": str(spec.image_size), "channels": str(spec.channels)}


def example_input(checkpoint: Checkpoint, input_kind: str, batch: int = 2) -> torch.Tensor:
    s, c = checkpoint.preprocess.image_size, checkpoint.preprocess.channels
    gen = torch.Generator().manual_seed(0)
    if input_kind == "uint8":
        return torch.randint(0, 256, (batch, s, s, c), generator=gen, dtype=torch.uint8)
    return torch.rand(batch, c, s, s, generator=gen) * 2 - 1


def onnx_proto(checkpoint: Checkpoint, input_kind: str = "float"):
    """The ONNX ModelProto of the checkpoint's ScoreGraph, with ama_stream metadata."""
    onnx = require("onnx", "exporting to ONNX")
    require("onnxscript", "exporting to ONNX (torch.onnx's exporter)")
    graph = score_graph(checkpoint, input_kind)
    x = example_input(checkpoint, input_kind)
    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter():
        path = Path(tmp) / "graph.onnx"
        with torch.no_grad():
            program = torch.onnx.export(
                graph, (x,), None, input_names=["images"], output_names=["r", "features"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                opset_version=OPSET, external_data=False, verbose=False,
            )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(path), external_data=False)
        proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in graph_metadata(checkpoint, input_kind).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"ama_stream.{key}", value
    return proto


def _check_out(out: Path) -> None:
    """Fails early, in one line, when `out` cannot be written (before the export's seconds of work):
    the folder must exist and take a new file (tried for real: permission bits do not tell root's story)."""
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ValueError(f"cannot write {out}: it is a directory; name the file to write")
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"cannot write {out}: folder {parent} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"cannot write {out}: folder {parent} does not take new files ({exc.strerror or exc})") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"cannot write {out}: the file exists and is not writable")


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's exporter logs every optimisation pass at INFO and warns about absent torchvision ops."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if lg.name.startswith("onnx") else logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(checkpoint: Checkpoint, out: str | os.PathLike, input_kind: str = "float") -> list[Path]:
    """Writes the ScoreGraph as one ONNX file (atomically); returns the files written."""
    onnx = require("onnx", "exporting to ONNX")
    out = Path(out)
    _check_out(out)
    proto = onnx_proto(checkpoint, input_kind)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    try:
        try:
            onnx.save(proto, tmp)
            os.replace(tmp, out)
        except OSError as exc:
            raise ValueError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return [out]


def export_openvino(checkpoint: Checkpoint, out: str | os.PathLike, input_kind: str = "float") -> list[Path]:
    """Writes the ScoreGraph as OpenVINO IR: `out` (.xml) and the weights beside it (.bin)."""
    ov = require("openvino", "exporting to OpenVINO")
    onnx = require("onnx", "exporting to OpenVINO (through ONNX)")
    out = Path(out)
    if out.suffix != ".xml":
        raise ValueError(f"cannot write {out}: an OpenVINO IR is an .xml file (its weights go beside it as .bin)")
    _check_out(out)
    proto = onnx_proto(checkpoint, input_kind)
    parent = out.parent if str(out.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.", dir=parent) as tmp:
        onnx_path = Path(tmp) / "graph.onnx"
        onnx.save(proto, str(onnx_path))
        model = ov.convert_model(str(onnx_path))
        for key, value in graph_metadata(checkpoint, input_kind).items():
            model.set_rt_info(value, ["ama_stream", key])
        staged = Path(tmp) / "model.xml"
        ov.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), out.with_suffix(".bin"))  # weights first: the .xml names a whole model
        os.replace(staged, out)
    return [out, out.with_suffix(".bin")]


def export_model(checkpoint: str | os.PathLike | Checkpoint, fmt: str, out: str | os.PathLike,
                 input_kind: str = "float") -> list[Path]:
    """`ama-stream export`: the checkpoint's scoring graph in `fmt` (onnx or openvino) at `out`."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {input_kind!r}; use one of {', '.join(INPUT_KINDS)}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    # the package checks come before any work, so a missing runtime costs no time
    require("onnx", f"exporting to {fmt}")
    require("onnxscript", f"exporting to {fmt} (torch.onnx's exporter)")
    if fmt == "openvino":
        require("openvino", "exporting to OpenVINO")
        return export_openvino(ckpt, out, input_kind)
    return export_onnx(ckpt, out, input_kind)


# --------------------------------------------------------------------------- INT8


def quantize_onnx_int8(source: str | os.PathLike, out: str | os.PathLike, images: np.ndarray,
                       batch_size: int = 32, per_channel: bool = True) -> Path:
    """Static INT8 post-training quantization of an exported ONNX graph with ONNX Runtime (QDQ format),
    its activation ranges calibrated on `images` (known-normal model inputs the graph takes: float
    [N, C, S, S] or uint8 [N, S, S, C]). The metadata (model_id, ...) is kept. Returns `out`."""
    onnx = require("onnx", "INT8 quantization")
    quant = require("onnxruntime.quantization", "INT8 quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self._chunks = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

        def get_next(self) -> dict[str, Any] | None:
            chunk = next(self._chunks, None)
            return None if chunk is None else {"images": np.ascontiguousarray(chunk)}

    out = Path(out)
    _check_out(out)
    meta = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(source), str(prepped), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        quant.quantize_static(
            str(prepped), str(staged), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=per_channel,
            activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
            calibrate_method=quant.CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(staged))
        del proto.metadata_props[:]
        for key, value in {**meta, "ama_stream.quantized": "int8"}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(out))
    return out


def export_onnx_int8(checkpoint: Checkpoint, out: str | os.PathLike, images: np.ndarray,
                     input_kind: str = "float") -> list[Path]:
    """The ONNX graph quantized to INT8 (quantize_onnx_int8), calibrated on `images`: known-normal images
    already fitted to the model size (uint8 [N, S, S, C]). ONNX Runtime and OpenVINO both run the result.
    Measured on the Fashion-MNIST preset: AUROC change < 0.002 (docs/benchmarks.md)."""
    from .preprocess import to_tensor

    require("onnxruntime", "INT8 quantization")
    if checkpoint.feature_gaussian is not None:
        raise ValueError(feature_gaussian.INT8_REFUSED)
    if len(images) == 0:
        raise ValueError("INT8 quantization needs normal images to calibrate on; the source gave none")
    inputs = images if input_kind == "uint8" else to_tensor(images).numpy()
    out = Path(out)
    _check_out(out)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(checkpoint, Path(tmp) / "fp32.onnx", input_kind)[0]
        return [quantize_onnx_int8(fp32, out, inputs)]
