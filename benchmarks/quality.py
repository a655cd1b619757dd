"""Run a training preset end to end (train -> fit mu/sigma -> evaluate the protocol's test set) and
append one row per seed to docs/results.md (and benchmarks/results/quality.jsonl).

    python benchmarks/quality.py --config configs/fmnist_vs_mnist_cpu.yaml --seeds 0,1,2
    python benchmarks/quality.py --config configs/fmnist_vs_mnist_cpu.yaml --seeds 0 \
        --label "w/o mirrored" --set model.mirrored=false
    python benchmarks/quality.py --config configs/fmnist_vs_mnist_cpu.yaml --seeds 0 \
        --baseline pca --baseline autoencoder --holdout folder:cifar10-jpeg/test

--baseline runs PCA and/or the plain E+G autoencoder (training/baselines.py) on the same training
and test images in the same run. --holdout scores a second anomaly set, never used for tuning,
against the same normal test images. Each row also holds recall at the operating false-alarm
rates (training/evaluate.py operating_points).

Not a test: it measures. Rows record the commit, so numbers stay attributable.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ama_stream.logs import configure_logging  # noqa: E402
from ama_stream.settings import load_settings, parse_overrides  # noqa: E402
from ama_stream.calibration import Calibration  # noqa: E402
from ama_stream.scoring import Scorer  # noqa: E402
from ama_stream.sources import parse_source, resolve_data_root  # noqa: E402
from training.baselines import autoencoder_baseline, pca_baseline  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.datasets import build_protocol, build_test_set  # noqa: E402
from training.evaluate import detection_metrics  # noqa: E402
from training.trainer import train  # noqa: E402

RESULTS_MD = REPO / "docs" / "results.md"
RESULTS_JSONL = REPO / "benchmarks" / "results" / "quality.jsonl"
HEADER = (
    "| date | commit | preset | variant | seed | steps | AUROC A | AUROC R | AUPR A | AUPR R | F1 A | FAR A | wall |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_row(row: dict, markdown: bool = True) -> None:
    RESULTS_JSONL.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS_JSONL.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if not markdown:
        return
    if not RESULTS_MD.exists() or "| date | commit |" not in RESULTS_MD.read_text():
        with RESULTS_MD.open("a") as f:
            f.write("\n## Runs (appended by benchmarks/quality.py)\n\n" + HEADER)
    cells = [row["date"], row["commit"], row["preset"], row["variant"], str(row["seed"]), str(row["steps"])]
    cells += [f"{row[k]:.3f}" for k in ("auroc_a", "auroc_r", "aupr_a", "aupr_r", "f1_a", "far_a")]
    cells.append(f"{row['wall_s'] / 60:.1f} min")
    with RESULTS_MD.open("a") as f:
        f.write("| " + " | ".join(cells) + " |\n")


METRIC_KEYS = ("auroc_a", "auroc_r", "aupr_a", "aupr_r", "f1_a", "far_a", "n_normal", "n_anomaly")


def seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


def ama_run(cfg: TrainConfig, data, out: Path, data_root: Path, seed: int, holdout: str | None) -> dict:
    """Train AMA, and its row: the test metrics, the operating points and (with `holdout`) the
    second anomaly set scored against the same normal test images. wall_s is the training run's."""
    t0 = time.monotonic()
    ckpt = train(cfg, out_dir=out, data=data)
    m = ckpt.metrics
    row = {"steps": m["steps"], "wall_s": round(time.monotonic() - t0, 1), **{k: m[k] for k in METRIC_KEYS},
           **{k: v for k, v in m.items() if k.startswith(("recall_", "far_"))}}
    if holdout:
        test = build_test_set(cfg.data, data_root, seed, anomaly=parse_source(holdout))
        hold = detection_metrics(Scorer(ckpt, device=cfg.device).r_scores(test.images), test.labels,
                                 Calibration.from_checkpoint(ckpt))
        row["holdout"] = {"source": holdout, **{k: hold[k] for k in ("auroc_a", "auroc_r", "n_anomaly")}}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", default=[0], type=seed_list, help="comma-separated seeds")
    p.add_argument("--label", default="full", help="variant name for the table (e.g. 'w/o mirrored')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(REPO / "runs" / "quality"))
    p.add_argument("--no-md", action="store_true", help="record in quality.jsonl only (exploratory sweeps)")
    p.add_argument("--baseline", action="append", default=[], choices=["pca", "autoencoder"],
                   help="also run this baseline on the same images (repeatable)")
    p.add_argument("--holdout", metavar="SOURCE", help="a second anomaly set scored against the same normal test images")
    p.add_argument("--baselines-only", action="store_true",
                   help="skip AMA: only the --baseline methods, at the preset's step budget (jsonl only)")
    args = p.parse_args()
    if args.baselines_only and not args.baseline:
        p.error("--baselines-only needs at least one --baseline")
    if args.baselines_only and args.holdout:
        p.error("--holdout scores the AMA model, which --baselines-only does not train")
    configure_logging("INFO")
    preset = Path(args.config).stem
    for seed in args.seeds:
        cfg = load_settings(TrainConfig, args.config, parse_overrides(args.set + [f"seed={seed}"]))
        data_root = resolve_data_root(cfg.data_root)
        data = build_protocol(cfg.data, data_root, seed)
        out = Path(args.out) / f"{preset}-{args.label.replace(' ', '_').replace('/', '')}-seed{seed}"
        row = {"date": date.today().isoformat(), "commit": commit(), "preset": preset, "variant": args.label,
               "overrides": args.set, "seed": seed}
        if args.baselines_only:
            row.update(steps=cfg.train.epochs * cfg.train.steps_per_epoch, n_normal=data.test.n_normal,
                       n_anomaly=data.test.n_anomaly)
        else:
            row.update(ama_run(cfg, data, out, data_root, seed, args.holdout))
        t0 = time.monotonic()
        if "pca" in args.baseline:
            row["pca"] = pca_baseline(data.train, data.test.images, data.test.labels, seed)
        if "autoencoder" in args.baseline:
            row["autoencoder"] = autoencoder_baseline(cfg, data.train, data.test.images, data.test.labels, row["steps"])
        row.setdefault("wall_s", round(time.monotonic() - t0, 1))  # a baselines-only row: the baselines' time
        append_row(row, markdown=not (args.no_md or args.baselines_only))
        print(json.dumps(row))
    return 0

if __name__ == "__main__":
    sys.exit(main())
