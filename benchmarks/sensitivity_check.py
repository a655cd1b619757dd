"""Does the label-free sensitivity check mean something? For trained models of different quality on
data sets with real defects, compare what the check says (synthetic defects caught at the model's
default threshold, without any defect image) with what real defects say (AUROC, and recall at the
same threshold), and report the rank correlation per data set.

    python benchmarks/sensitivity_check.py runs/a/model.pt runs/b/model.pt ... [--half val]

Each checkpoint is measured on its own training protocol's test set: the held-out good images and the
real defects; for industrial protocols only the `val` half (benchmarks/industrial.py's split by file
name), unless --half all. The check itself uses up to 40 of the held-out good images. Rows go to
benchmarks/results/sensitivity.jsonl; --plot FILE draws check vs AUROC per data set.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scipy.stats import spearmanr  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from ama_stream import sensitivity  # noqa: E402
from ama_stream.calibration import Calibration  # noqa: E402
from ama_stream.checkpoint import load_checkpoint  # noqa: E402
from ama_stream.logs import configure_logging  # noqa: E402
from ama_stream.scoring import Scorer  # noqa: E402
from ama_stream.sources import resolve_data_root  # noqa: E402
from benchmarks.industrial import half_of  # noqa: E402
from benchmarks.quality import commit  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.datasets import EvalSet, build_test_set  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "sensitivity.jsonl"


def dataset_name(cfg: TrainConfig) -> str:
    return Path(str(cfg.data.normal.root)).parts[0] if cfg.data.normal else "?"


def measure(path: Path, half: str) -> dict:
    ckpt = load_checkpoint(path)
    stored = {k: v for k, v in ckpt.train_config.items() if k != "data_root"}
    cfg = TrainConfig.model_validate(stored)
    test = build_test_set(cfg.data, resolve_data_root(None), cfg.seed)
    if cfg.data.protocol == "industrial" and half != "all":
        keep = np.array([half_of(i) == half for i in test.ids])
        test = EvalSet(test.images[keep], test.labels[keep], tuple(i for i, k in zip(test.ids, keep) if k),
                       test.shapes[keep] if test.shapes is not None else None)
    scorer = Scorer(ckpt, "cpu")
    calibration = Calibration.from_checkpoint(ckpt)
    r = scorer.r_scores(test.images, batch_size=16)
    alerts = calibration.decide(r).anomaly
    sens = sensitivity.check_held_out(scorer, calibration, test.images, test.labels, test.shapes, cfg.seed,
                                      ckpt.train_config)
    return {"date": date.today().isoformat(), "commit": commit(), "checkpoint": str(path), "dataset": dataset_name(cfg),
            "protocol": cfg.data.protocol, "half": half, "steps": ckpt.metrics.get("steps"),
            "auroc": float(roc_auc_score(test.labels, r)), "recall_at_threshold": float(alerts[test.labels == 1].mean()),
            "false_alarms_at_threshold": float(alerts[test.labels == 0].mean()),
            "synthetic_mean_rate": sens.mean_rate,
            "synthetic_rate_strong": float(np.mean([v for (k, s, c), v in sens.rates.items() if c == max(sens.contrasts)])),
            "minimum_detectable_px": sens.minimum, "seen_in_training": list(sens.seen_in_training),
            "n_good": int((test.labels == 0).sum()), "n_defect": int((test.labels == 1).sum())}


def correlations(rows: list[dict]) -> dict:
    out = {}
    for name in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == name]
        if len(sub) < 3:
            continue
        rate = [r["synthetic_mean_rate"] for r in sub]
        out[name] = {"models": len(sub),
                     "spearman_rate_vs_auroc": float(spearmanr(rate, [r["auroc"] for r in sub]).statistic),
                     "spearman_rate_vs_recall": float(spearmanr(rate, [r["recall_at_threshold"] for r in sub]).statistic)}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, name in enumerate(names):
        sub = [r for r in rows if r["dataset"] == name]
        x = [r["synthetic_mean_rate"] for r in sub]
        axes[0].scatter(x, [r["auroc"] for r in sub], color=f"C{k}", label=name)
        axes[1].scatter(x, [r["recall_at_threshold"] for r in sub], color=f"C{k}", label=name)
    axes[0].set_ylabel("real defects: AUROC")
    axes[1].set_ylabel("real defects: recall at the default threshold")
    for ax in axes:
        ax.set_xlabel("synthetic defects caught at the default threshold (no defect image)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path)
    p.add_argument("--half", default="val", choices=["val", "test", "all"])
    p.add_argument("--summary", action="store_true", help="only summarise the rows recorded so far")
    p.add_argument("--plot", type=Path, help="scatter of check vs real defects per data set")
    args = p.parse_args()
    configure_logging("WARNING")
    rows = []
    for path in args.checkpoints:
        row = measure(path, args.half)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    if args.summary or args.plot:
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        print(json.dumps(correlations(rows), indent=2))
        if args.plot:
            plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
