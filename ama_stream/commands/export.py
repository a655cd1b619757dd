"""`ama-stream export`: the checkpoint's scoring graph (E, G, critic and the R tail in ONE graph,
dynamic batch) as ONNX or OpenVINO IR, for `--runtime onnxruntime|openvino` or other programs.
The work is ama_stream.export.export_model; this module parses and dispatches."""
from __future__ import annotations

import argparse

from ama_stream.runtimes import EXPORT_FORMATS, INPUT_KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="the model checkpoint to export")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="onnx (ONNX Runtime, needs ama-stream[onnx]) or openvino (IR .xml + .bin, needs "
                             "ama-stream[openvino])")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write (.onnx; .xml for openvino)")
    parser.add_argument("--input", choices=INPUT_KINDS, default="float",
                        help="graph input: float [B, C, S, S] in [-1, 1] (the Scorer's model input, default) or "
                             "uint8 [B, S, S, C] images already at the model size")


def run(args: argparse.Namespace) -> int:
    from ama_stream.export import export_model

    written = export_model(args.checkpoint, args.format, args.out, args.input)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
