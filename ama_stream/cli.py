"""`ama-stream` entry point: parses, dispatches to a command module, turns errors into one line.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
only the chosen command's module is imported. `train` and `evaluate` live in the `training`
package (installed alongside), so the runtime package never imports training code at import time.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .logs import configure_logging

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.commands.train", "train an AMA model on normal data"),
    "evaluate": ("training.commands.evaluate", "evaluate a checkpoint as the paper does (AUROC/AUPR/F1)"),
    "calibrate": ("ama_stream.commands.calibrate", "fit mu/sigma and the alert threshold on normal data"),
    "serve": ("ama_stream.commands.serve", "run the Kafka scoring agent"),
    "export": ("ama_stream.commands.export", "export the scoring graph (images -> R) to ONNX or OpenVINO"),
    "produce": ("ama_stream.commands.produce", "publish image frames from a data source to Kafka"),
    "demo": ("training.commands.demo", "end-to-end demo on an embedded broker"),
    "view": ("ama_stream.commands.view", "a live web page of the alerts: frames, regions, maps, rates, drift"),
    "broker": ("ama_stream.commands.broker", "run the embedded Kafka-protocol broker (tansu): IN MEMORY, for trials "
               "only (a restart loses every topic and reuses offsets)"),
}

USAGE_ERROR = 2
FAILURE = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as a single line on stderr."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _build_parser(chosen: str | None) -> OneLineParser:
    parser = OneLineParser(prog="ama-stream", description="Streaming image anomaly detection (AMA).")
    parser.add_argument("--log-level", default=os.environ.get("AMA_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (stderr)")
    parser.add_argument("--log-json", action="store_true", default=os.environ.get("AMA_LOG_JSON", "") not in ("", "0"),
                        help="log one JSON object per line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_path, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_path)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = _build_parser(chosen)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    configure_logging(args.log_level, args.log_json)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"ama-stream {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("AMA_DEBUG"):
            raise
        logging.getLogger("ama_stream").debug("command failed", exc_info=True)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ama-stream {args.command}: error: {reason}", file=sys.stderr)
        return FAILURE


if __name__ == "__main__":
    sys.exit(main())
