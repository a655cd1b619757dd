"""`ama-stream evaluate`: score a test protocol with a checkpoint; ONE JSON line on stdout.

Test data defaults to the protocol in the checkpoint's training config; --normal/--anomaly
replace either side (anomalies are still sampled to data.anomaly_fraction of the normal count).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ama_stream.checkpoint import load_checkpoint
from ama_stream.fileio import atomic_write_bytes
from ama_stream.scoring import Scorer
from ama_stream.settings import SettingsError, deep_merge, load_settings, parse_overrides
from ama_stream.sources import parse_source, resolve_data_root

from ..config import TrainConfig
from ama_stream.calibration import Calibration

from ..datasets import build_test_set
from ..evaluate import full_metrics, human_table, r_scores

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model.pt written by `ama-stream train`")
    p.add_argument("--config", help="training YAML whose data section defines the test protocol "
                                     "(default: the checkpoint's own training config)")
    p.add_argument("--normal", metavar="SOURCE", help="replace the normal test data, e.g. folder:/data/line3/good")
    p.add_argument("--anomaly", metavar="SOURCE", help="replace the anomalous test data, e.g. idx:mnist")
    p.add_argument("--normal-classes", help="class selection for --normal, comma separated")
    p.add_argument("--anomaly-classes", help="class selection for --anomaly, comma separated")
    p.add_argument("--data-root", help="folder that relative data roots resolve against (default: AMA_DATA_ROOT)")
    p.add_argument("--seed", type=int, help="seed of the test sampling (default: the training seed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--plots", metavar="DIR", help="write the report there: R-score densities (the paper's Fig. 4), "
                                                  "ROC and PR curves, reconstructions and report.html")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the training config's data section, e.g. data.limit_test=500")


def _classes(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def run(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    overrides = parse_overrides(args.set)
    if args.config:
        cfg = load_settings(TrainConfig, args.config, overrides)
    else:
        if not ckpt.train_config.get("data"):
            raise SettingsError(f"{args.checkpoint}: checkpoint has no training config; pass --config")
        stored = {k: v for k, v in ckpt.train_config.items() if k != "data_root"}  # paths of the training machine
        cfg = TrainConfig.model_validate(deep_merge(stored, overrides))
    seed = cfg.seed if args.seed is None else args.seed
    normal = parse_source(args.normal, _classes(args.normal_classes)) if args.normal else None
    anomaly = parse_source(args.anomaly, _classes(args.anomaly_classes)) if args.anomaly else None
    data_root = resolve_data_root(args.data_root)
    test = build_test_set(cfg.data, data_root, seed, normal=normal, anomaly=anomaly)
    scorer = Scorer(ckpt, device=args.device)
    r = r_scores(scorer, test.images, batch_size=args.batch_size)
    calibration = Calibration.from_checkpoint(ckpt)
    result = full_metrics(r, test.labels, calibration, seed)
    result.update(
        model_id=ckpt.model_id,
        checkpoint=str(Path(args.checkpoint)),
        protocol=cfg.data.protocol,
        normal=(normal or cfg.data.normal).model_dump(mode="json"),
        anomaly=(anomaly or cfg.data.anomaly).model_dump(mode="json") if (anomaly or cfg.data.anomaly) else None,
        seed=seed,
    )
    if args.plots:
        from ..report import write_report  # matplotlib only when asked

        normal, anomaly = test.labels == 0, test.labels == 1
        a = -calibration.decide(r).log_a
        report = write_report(args.plots, scorer, title=f"ama-stream evaluate: model {ckpt.model_id}", metrics=result,
                              normal_images=test.images[normal], r_normal=r[normal],
                              anomaly_images=test.images[anomaly], r_anomaly=r[anomaly],
                              a_normal=a[normal], a_anomaly=a[anomaly])
        result["report"] = str(report)
    line = json.dumps(result, sort_keys=True)
    if args.out:
        atomic_write_bytes(args.out, (line + "\n").encode())
    print(human_table(result), file=sys.stderr, flush=True)
    print(line, file=sys.stdout, flush=True)
    return 0
