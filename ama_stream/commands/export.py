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
    parser.add_argument("--int8", metavar="SOURCE",
                        help="quantize the ONNX graph to INT8 (static, ONNX Runtime), calibrated on known-normal "
                             "images from SOURCE (e.g. folder:/data/line3/good); --format onnx only; the result "
                             "runs with --runtime onnxruntime or openvino")
    parser.add_argument("--int8-images", type=int, default=512, metavar="N",
                        help="normal images the INT8 ranges are calibrated on (default 512, a seeded sample)")
    parser.add_argument("--data-root", metavar="DIR", help="where relative roots resolve (default: $AMA_DATA_ROOT)")


def run(args: argparse.Namespace) -> int:
    from ama_stream.export import export_model

    if args.int8 is None:
        written = export_model(args.checkpoint, args.format, args.out, args.input)
    else:
        written = _export_int8(args)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _export_int8(args: argparse.Namespace):
    import numpy as np

    from ama_stream.checkpoint import load_checkpoint
    from ama_stream.export import export_onnx_int8
    from ama_stream.sources import load_images, parse_source

    if args.format != "onnx":
        raise ValueError("--int8 writes an ONNX graph: use --format onnx (OpenVINO runs it with --runtime openvino "
                         "--runtime-model FILE.onnx)")
    if args.int8_images < 1:
        raise ValueError(f"--int8-images must be >= 1, got {args.int8_images}")
    ckpt = load_checkpoint(args.checkpoint)
    images = load_images(parse_source(args.int8), args.data_root, ckpt.preprocess).images
    if len(images) > args.int8_images:
        images = images[np.sort(np.random.default_rng(0).choice(len(images), args.int8_images, replace=False))]
    return export_onnx_int8(ckpt, args.out, images, args.input)
