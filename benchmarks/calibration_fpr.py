"""False-alarm rates on held-out normal data: calibrated thresholds against the checkpoint's |z| > 3.

    python benchmarks/calibration_fpr.py --checkpoint ~/.cache/ama-stream/demo/model-*.pt
    python benchmarks/calibration_fpr.py --checkpoint C --source folder:/data/line3/good --n-calibrate 20000

Scores the first --n-calibrate normal frames of --source (split --split) and the rest (up to
--n-held-out) once; then for each policy/target fits a calibration on the first part (as
`ama-stream calibrate` does) and measures the share of the held-out part it alerts on, next to the
expected rate and its standard error (calibration draw + test draw). Also the checkpoint fallback
(training mu/sigma, two-sided |z| > 3) and the KS distance of the held-out p-values from uniform.
Use frames the model was not trained on: its own training frames score lower than new ones.
Writes benchmarks/results/calibration_fpr.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
from scipy import stats

from ama_stream.calibration import Calibration, CalibrationFitter, Policy
from ama_stream.scoring import Scorer
from ama_stream.sources import iter_images, parse_source

RESULTS = Path(__file__).resolve().parent / "results" / "calibration_fpr.json"


def scores_of(scorer: Scorer, source: str, split: str, data_root: str | None, limit: int | None) -> np.ndarray:
    images = []
    for count, (_id, image, _label) in enumerate(iter_images(parse_source(source).with_split(split), data_root), 1):
        images.append(image)
        if limit is not None and count >= limit:
            break
    return scorer.r_scores(scorer.prepare(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--source", default="idx:fashion-mnist", help="normal frames (default idx:fashion-mnist)")
    parser.add_argument("--split", default="test", help="split of --source (default test: frames not trained on)")
    parser.add_argument("--n-calibrate", type=int, default=5000)
    parser.add_argument("--n-held-out", type=int, help="held-out frames after the calibration ones (default: the rest)")
    parser.add_argument("--targets", default="0.05,0.01,0.001")
    parser.add_argument("--data-root")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    scorer = Scorer(args.checkpoint, args.device)
    t0 = time.monotonic()
    limit = None if args.n_held_out is None else args.n_calibrate + args.n_held_out
    r = scores_of(scorer, args.source, args.split, args.data_root, limit)
    cal_r, test_r = r[: args.n_calibrate], r[args.n_calibrate :]
    if len(test_r) == 0:
        raise SystemExit(f"{args.source} ({args.split}) has only {len(r)} frames: nothing left to hold out")
    rows = []

    def measure(name: str, calibration: Calibration, target: float | None, fitted: bool = True) -> None:
        d = calibration.decide(test_r)
        rate = float(d.anomaly.mean())
        expected = calibration.rule().expected_fpr
        rows.append({
            "rule": name, "target_fpr": target, "expected_fpr": expected, "measured_fpr": rate,
            # a fitted threshold is itself random (it depends on the calibration draw): both terms count
            "se": math.sqrt(expected * (1 - expected) * ((1 / (len(cal_r) + 1) if fitted else 0) + 1 / len(test_r))),
            "threshold": calibration.rule().threshold, "ks_distance": float(stats.kstest(d.p_value, "uniform").statistic),
        })

    measure("checkpoint |z|>3 (training mu/sigma)", Calibration.from_checkpoint(scorer.checkpoint), None, fitted=False)
    for policy_name in ("two-sided", "upper"):
        for target in (float(t) for t in args.targets.split(",")):
            fitter = CalibrationFitter()
            fitter.update(cal_r)
            calibration, _ = fitter.finish(scorer.model_id, Policy(policy_name, target), {"spec": args.source})
            measure(f"{policy_name} target {target:g}", calibration, target)
    fitter = CalibrationFitter()
    fitter.update(cal_r)
    measure("sigma k=3 (calibrated mu/sigma)", fitter.finish(scorer.model_id, Policy.make("sigma"), {})[0], None)

    result = {
        "checkpoint": str(args.checkpoint), "model_id": scorer.model_id, "device": str(scorer.device),
        "machine": platform.processor() or platform.machine(), "n_calibrate": len(cal_r), "n_held_out": len(test_r),
        "calibrate_on": f"{args.source} ({args.split}) frames 0..{len(cal_r) - 1}",
        "held_out": f"{args.source} ({args.split}) frames {len(cal_r)}..{len(r) - 1}",
        "seconds": round(time.monotonic() - t0, 1), "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"calibrated on {result['calibrate_on']}, measured on {result['held_out']}")
    print(f"{'rule':<40} {'expected':>9} {'measured':>9} {'+-1 se':>8} {'threshold':>10} {'KS D(p)':>8}")
    for row in rows:
        print(f"{row['rule']:<40} {row['expected_fpr']:>9.4f} {row['measured_fpr']:>9.4f} {row['se']:>8.4f} "
              f"{row['threshold']:>10.3f} {row['ks_distance']:>8.4f}")


if __name__ == "__main__":
    main()
