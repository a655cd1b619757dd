"""`ama-stream train`: train on a config, write OUT/model.pt, metrics.json, metrics.csv and the report.

`--normal folder:DIR` (and optionally `--anomaly folder:DIR`) trains on your own images; without
`--config` the template configs/own_data.yaml is used. With good images only, a seeded slice of
them (data.test_fraction) is held out and the report says what can be known without labels.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ama_stream.settings import SettingsError, deep_merge, load_settings, parse_overrides
from ama_stream.sources import parse_source

from ..config import TrainConfig
from ..trainer import train


OWN_DATA_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "own_data.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training YAML (configs/*.yaml; default with --normal: configs/own_data.yaml)")
    p.add_argument("--normal", metavar="SOURCE", help="the good images, e.g. folder:/data/line3/good (sets data.normal)")
    p.add_argument("--anomaly", metavar="SOURCE", help="defect images for the report, e.g. folder:/data/line3/bad "
                                                      "(sets data.anomaly; optional)")
    p.add_argument("--normal-classes", help="class selection for --normal, comma separated")
    p.add_argument("--anomaly-classes", help="class selection for --anomaly, comma separated")
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count undecodable images instead of stopping")
    p.add_argument("--data-root", help="folder that relative data roots resolve against (default: AMA_DATA_ROOT)")
    p.add_argument("--out", help="output folder (default: runs/<config name>-<time>)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--max-steps", type=int, help="stop after N encoder/generator steps")
    p.add_argument("--device", help="auto, cpu or cuda:N")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--resume", help="continue from OUT/train_state.pt of an earlier run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable)")


def _source(text: str, classes: str | None, skip_corrupt: bool) -> dict:
    return parse_source(text, classes, skip_corrupt).model_dump(mode="json", exclude_none=True)


def overrides_from_args(args: argparse.Namespace) -> dict:
    flags: dict = {}
    data: dict = {}
    if args.normal:
        data["normal"] = _source(args.normal, args.normal_classes, args.skip_corrupt)
    if args.anomaly:
        data["anomaly"] = _source(args.anomaly, args.anomaly_classes, args.skip_corrupt)
    if data:
        flags["data"] = data
    if args.epochs is not None:
        flags.setdefault("train", {})["epochs"] = args.epochs
    if args.max_steps is not None:
        flags.setdefault("train", {})["max_steps"] = args.max_steps
    for key in ("device", "seed", "data_root"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    return deep_merge(parse_overrides(args.set), flags)  # explicit flags win over --set


def run(args: argparse.Namespace) -> int:
    config = args.config
    if config is None:
        if not args.normal:
            raise SettingsError("pass --config FILE, or --normal SOURCE to train on your own images")
        if not OWN_DATA_CONFIG.is_file():
            raise SettingsError(f"no --config given and the template {OWN_DATA_CONFIG} is missing; pass --config")
        config = OWN_DATA_CONFIG
    overrides = overrides_from_args(args)
    if args.skip_corrupt and not args.normal:
        raise SettingsError("--skip-corrupt applies to --normal/--anomaly; in a config set skip_corrupt: true on a source")
    replaced = tuple(f"data.{side}" for side in ("normal", "anomaly") if getattr(args, side))
    cfg = load_settings(TrainConfig, config, overrides, replace=replaced)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    ckpt = train(cfg, out_dir=out, resume=args.resume)
    summary = {k: ckpt.metrics[k] for k in ("auroc_a", "auroc_r") if k in ckpt.metrics}
    print(f"wrote {out / 'model.pt'} (model {ckpt.model_id}) " + " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return 0
