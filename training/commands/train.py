"""`ama-stream train`: train on a config, write OUT/model.pt and OUT/metrics.json."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ama_stream.settings import deep_merge, load_settings, parse_overrides

from ..config import TrainConfig
from ..trainer import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    p.add_argument("--data-root", help="folder that relative data roots resolve against (default: AMA_DATA_ROOT)")
    p.add_argument("--out", help="output folder (default: runs/<config name>-<time>)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--max-steps", type=int, help="stop after N encoder/generator steps")
    p.add_argument("--device", help="auto, cpu or cuda:N")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--resume", help="continue from OUT/train_state.pt of an earlier run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable)")


def overrides_from_args(args: argparse.Namespace) -> dict:
    flags: dict = {}
    if args.epochs is not None:
        flags.setdefault("train", {})["epochs"] = args.epochs
    if args.max_steps is not None:
        flags.setdefault("train", {})["max_steps"] = args.max_steps
    for key in ("device", "seed", "data_root"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    return deep_merge(parse_overrides(args.set), flags)  # explicit flags win over --set


def run(args: argparse.Namespace) -> int:
    cfg = load_settings(TrainConfig, args.config, overrides_from_args(args))
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    ckpt = train(cfg, out_dir=out, resume=args.resume)
    summary = {k: ckpt.metrics[k] for k in ("auroc_a", "auroc_r") if k in ckpt.metrics}
    print(f"wrote {out / 'model.pt'} (model {ckpt.model_id}) " + " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return 0
