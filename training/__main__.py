"""`python -m training [options]` is `ama-stream train [options]`: the entry point torchrun starts once
per process for distributed training (`ama-stream train --nproc N` launches it the same way):

    torchrun --standalone --nproc_per_node 2 -m training --config configs/fmnist_vs_mnist_cpu.yaml --out runs/fm

`--log-level`/`--log-json` may come anywhere (or AMA_LOG_LEVEL / AMA_LOG_JSON).
"""
from __future__ import annotations

import sys

from ama_stream.cli import main


def _argv(args: list[str]) -> list[str]:
    """`ama-stream`'s global logging options in front of the `train` command, the rest after it."""
    front, rest = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--log-json":
            front.append(arg)
        elif arg == "--log-level" and i + 1 < len(args):
            front += args[i:i + 2]
            i += 1
        elif arg.startswith("--log-level="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return [*front, "train", *rest]


if __name__ == "__main__":
    sys.exit(main(_argv(sys.argv[1:])))
