"""Scorer speed per runtime (torch eager, ONNX Runtime, OpenVINO) and INT8 post-training quantization;
writes JSON and a markdown table.

    python benchmarks/runtime_bench.py                                   # speed at paper/narrow/cpu widths, 32 and 64
    python benchmarks/runtime_bench.py --checkpoint runs/fmnist/model.pt  # + INT8 speed and AUROC change (F-MNIST vs MNIST)
    python benchmarks/runtime_bench.py --smoke                           # a few iterations: proves the code runs, measures nothing

Sections:
- speed: for each width preset (paper: E 64 / G 256 / D 128, nz 128; narrow: 32/64/64, nz 64; cpu: the
  CPU presets' model, 32/32/32, nz 64), image size and batch size, one Scorer per runtime on the same
  random checkpoint, timed ALTERNATELY in one process (torch, onnxruntime, openvino, torch, ...) so that
  background load hits every runtime alike; frames/s from the median batch time, and the ratio to
  torch eager. Every runtime gets the same thread count (--threads, default torch's).
- int8: the checkpoint's graph exported to ONNX, quantized statically (ONNX Runtime, QDQ, per-channel
  INT8 weights, UInt8 activations calibrated by MinMax on --calib-images normal Fashion-MNIST training
  images), then scored against torch and the float32 graph on Fashion-MNIST test (normal) vs MNIST test
  sampled to 20% of the normal count (the paper's cross-dataset protocol): AUROC of R and of the A-score
  (each runtime with a calibration fitted on its own R of the calibration images, as `ama-stream calibrate
  --runtime` would), the AUROC change against torch, and frames/s at --int8-batch. Without --checkpoint
  the section runs on an untrained model of the cpu preset: its AUROCs mean nothing (smoke only).

Decision rule from issue 11: a runtime >= 1.5x torch on the cpu preset becomes the CPU default when
installed; INT8 is offered only if its AUROC drops by < 0.005.

Results go to benchmarks/results/runtime_bench.json and replace the block between
<!-- runtime_bench:begin --> and <!-- runtime_bench:end --> in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ops_bench import Preset, alternate, machine, make_checkpoint  # noqa: E402

from ama_stream.runtimes import GRAPH_RUNTIMES  # noqa: E402
from ama_stream.scoring import Scorer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC_TITLE = "# Benchmarks\n\nMeasured numbers, each table written by the script named in its section.\n"
SECTION_TITLE = "## Scorer runtimes: torch, ONNX Runtime, OpenVINO, INT8 (benchmarks/runtime_bench.py)"
BEGIN, END = "<!-- runtime_bench:begin -->", "<!-- runtime_bench:end -->"

PRESETS = {
    "paper": Preset("paper", enc=64, gen=256, disc=128, nz=128),
    "narrow": Preset("narrow", enc=32, gen=64, disc=64, nz=64),
    "cpu": Preset("cpu", enc=32, gen=32, disc=32, nz=64),  # configs/*_cpu.yaml
}
PACKAGES = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino", "onnx", "onnxscript")}


def available_runtimes(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """The runtimes to measure, and why the others are left out."""
    runtimes, missing = ["torch"], {}
    for rt in wanted:
        if rt == "torch":
            continue
        absent = [p for p in PACKAGES[rt] if importlib.util.find_spec(p) is None]
        if absent:
            missing[rt] = f"not installed ({', '.join(absent)})"
        else:
            runtimes.append(rt)
    return runtimes, missing


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- speed


def bench_speed(args: argparse.Namespace, runtimes: list[str], folder: Path) -> list[dict]:
    rows = []
    for preset_name in args.presets:
        for size in args.sizes:
            path = make_checkpoint(PRESETS[preset_name], size, args.channels, folder)
            setup_s, scorers = {}, {}
            for rt in runtimes:
                start = time.perf_counter()
                scorers[rt] = Scorer(path, "cpu", runtime=rt, runtime_threads=args.threads)
                setup_s[rt] = time.perf_counter() - start
            for batch in args.batch_sizes:
                x = torch.rand(batch, args.channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
                r = {rt: s.score_tensor(x).r for rt, s in scorers.items()}  # also checks they agree
                max_rel = max(float(np.max(np.abs(r[rt] - r["torch"]) / np.maximum(np.abs(r["torch"]), 1e-12)))
                              for rt in runtimes)
                med = alternate({rt: (lambda s=s: s.score_tensor(x)) for rt, s in scorers.items()}, torch.device("cpu"),
                                reps=args.reps, warmup=args.warmup)
                for rt in runtimes:
                    rows.append({"preset": preset_name, "image_size": size, "channels": args.channels, "batch": batch,
                                 "runtime": rt, "frames_per_s": batch / med[rt], "batch_ms": med[rt] * 1e3,
                                 "vs_torch": med["torch"] / med[rt], "setup_s": setup_s[rt],
                                 "max_rel_r_diff_vs_torch": max_rel})
                log(f"speed {preset_name} {size} b={batch}: " + ", ".join(
                    f"{rt} {batch / med[rt]:.1f} f/s (x{med['torch'] / med[rt]:.2f})" for rt in runtimes)
                    + f"; max rel R diff {max_rel:.1e}")
            del scorers
    return rows


# --------------------------------------------------------------------------- INT8


def _images(spec_text: str, split: str, data_root, preprocess, limit: int | None = None) -> np.ndarray:
    from ama_stream.sources import load_images, parse_source

    images = load_images(parse_source(spec_text).with_split(split), data_root, preprocess).images
    return images if limit is None else images[:limit]


def _auroc(r: np.ndarray, labels: np.ndarray, r_fit: np.ndarray, model_id: str) -> dict:
    from sklearn.metrics import roc_auc_score

    from ama_stream.calibration import Policy, fit_calibration

    calibration = fit_calibration(r_fit, model_id, Policy("two-sided"))
    a = -calibration.decide(r).log_a
    return {"auroc_r": float(roc_auc_score(labels, r)), "auroc_a": float(roc_auc_score(labels, a))}


def bench_int8(args: argparse.Namespace, runtimes: list[str], folder: Path) -> dict:
    from ama_stream.checkpoint import load_checkpoint
    from ama_stream.export import export_onnx, quantize_onnx_int8
    from ama_stream.preprocess import to_tensor
    from ama_stream.sources import resolve_data_root

    if "onnxruntime" not in runtimes:
        return {"skipped": "onnxruntime is not installed"}
    if args.checkpoint:
        path, trained = Path(args.checkpoint), True
    else:
        path, trained = make_checkpoint(PRESETS["cpu"], 32, 1, folder), False
    ckpt = load_checkpoint(path)
    spec = ckpt.preprocess
    data_root = resolve_data_root(args.data_root)
    calib = _images("idx:fashion-mnist", "train", data_root, spec, args.calib_images)
    normal = _images("idx:fashion-mnist", "test", data_root, spec, args.limit_test)
    mnist = _images("idx:mnist", "test", data_root, spec)
    pick = np.random.default_rng(args.seed).choice(len(mnist), size=max(1, round(0.2 * len(normal))), replace=False)
    test = np.concatenate([normal, mnist[np.sort(pick)]])
    labels = np.array([0] * len(normal) + [1] * len(pick))
    log(f"int8: checkpoint {path} ({'trained' if trained else 'UNTRAINED: AUROC meaningless'}); {len(calib)} calibration "
        f"images, test {len(normal)} normal + {len(pick)} anomalies")

    fp32_onnx = folder / "fp32.onnx"
    export_onnx(ckpt, fp32_onnx)
    start = time.perf_counter()
    int8_onnx = quantize_onnx_int8(fp32_onnx, folder / "int8.onnx", to_tensor(calib).numpy())
    quantize_s = time.perf_counter() - start
    variants = {"torch": dict(runtime="torch"), "onnxruntime fp32": dict(runtime="onnxruntime", runtime_model=str(fp32_onnx)),
                "onnxruntime int8": dict(runtime="onnxruntime", runtime_model=str(int8_onnx))}
    if "openvino" in runtimes:
        variants["openvino fp32"] = dict(runtime="openvino", runtime_model=str(fp32_onnx))
        variants["openvino int8"] = dict(runtime="openvino", runtime_model=str(int8_onnx))
    scorers = {name: Scorer(ckpt, "cpu", runtime_threads=args.threads, **kw) for name, kw in variants.items()}
    quality = {}
    for name, scorer in scorers.items():
        r_fit = scorer.r_scores(calib, batch_size=args.int8_batch)
        r = scorer.r_scores(test, batch_size=args.int8_batch)
        quality[name] = _auroc(r, labels, r_fit, ckpt.model_id)
        log(f"int8 quality {name}: AUROC R {quality[name]['auroc_r']:.4f} A {quality[name]['auroc_a']:.4f}")
    x = to_tensor(test[: args.int8_batch])
    med = alternate({name: (lambda s=s: s.score_tensor(x)) for name, s in scorers.items()}, torch.device("cpu"),
                    reps=args.reps, warmup=args.warmup)
    rows = []
    for name in variants:
        rows.append({"variant": name, "frames_per_s": len(x) / med[name], "vs_torch": med["torch"] / med[name],
                     **quality[name],
                     "auroc_r_change": quality[name]["auroc_r"] - quality["torch"]["auroc_r"],
                     "auroc_a_change": quality[name]["auroc_a"] - quality["torch"]["auroc_a"]})
        log(f"int8 speed {name}: {len(x) / med[name]:.1f} f/s (x{med['torch'] / med[name]:.2f})")
    return {"checkpoint": str(path), "trained": trained, "model": ckpt.model.to_dict(), "calib_images": len(calib),
            "test_normal": int(len(normal)), "test_anomaly": int(len(pick)), "batch": len(x), "quantize_s": quantize_s,
            "rows": rows}


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']} ({m['cpu_count']} CPU cores), {result['threads']} threads for every runtime, torch "
             f"{m['torch']}, {', '.join(f'{k} {v}' for k, v in result['versions'].items())}; {result['created_at']}"
             + (f", 1-min load average {m['load_average_1m']:.1f} at the end" if "load_average_1m" in m else "")
             + (" **(smoke run: a few iterations, not a measurement)**" if result["smoke"] else ""), ""]
    if result.get("missing"):
        lines += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in result["missing"].items()), ""]
    if result.get("speed"):
        lines += ["Frames/s per runtime on the same random checkpoint (alternated runs, medians); `x torch` is the "
                  "speed-up against torch eager (channels_last, float32, fused tail):", "",
                  "| preset | size | channels | batch | runtime | frames/s | x torch | max rel. R diff |",
                  "|---|---:|---:|---:|---|---:|---:|---:|"]
        lines += [f"| {r['preset']} | {r['image_size']} | {r['channels']} | {r['batch']} | {r['runtime']} | "
                  f"{r['frames_per_s']:.1f} | {r['vs_torch']:.2f}x | {r['max_rel_r_diff_vs_torch']:.1e} |"
                  for r in result["speed"]]
        lines.append("")
    int8 = result.get("int8")
    if int8 and "rows" in int8:
        lines += [f"INT8 static quantization (ONNX Runtime QDQ, {int8['calib_images']} Fashion-MNIST calibration images) "
                  f"on Fashion-MNIST vs MNIST ({int8['test_normal']} normal, {int8['test_anomaly']} anomalies), "
                  f"checkpoint `{int8['checkpoint']}`" + ("" if int8["trained"] else " **(untrained: AUROC meaningless)**")
                  + f", batch {int8['batch']}:", "",
                  "| variant | frames/s | x torch | AUROC R | change | AUROC A | change |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['frames_per_s']:.1f} | {r['vs_torch']:.2f}x | {r['auroc_r']:.4f} | "
                  f"{r['auroc_r_change']:+.4f} | {r['auroc_a']:.4f} | {r['auroc_a_change']:+.4f} |" for r in int8["rows"]]
        lines.append("")
    elif int8:
        lines += [f"INT8: skipped ({int8['skipped']})", ""]
    lines.append(f"Command: `{result['command']}`")
    return "\n".join(lines)


def write_doc(doc: Path, block: str) -> None:
    text = doc.read_text() if doc.exists() else DOC_TITLE
    if SECTION_TITLE not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION_TITLE}\n"
    generated = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + generated + text[text.index(END) + len(END):]
    else:
        at = text.index(SECTION_TITLE) + len(SECTION_TITLE)
        text = text[:at] + f"\n\n{generated}\n" + text[at:]
    doc.write_text(text)


def versions() -> dict[str, str]:
    out = {}
    for name in ("onnxruntime", "openvino", "onnx"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: not measured
            pass
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="speed,int8")
    p.add_argument("--runtimes", default="torch,onnxruntime,openvino")
    p.add_argument("--presets", default="paper,narrow,cpu")
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: torch's)")
    p.add_argument("--reps", type=int, default=9, help="alternated timed runs per point")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpoint", help="trained Fashion-MNIST checkpoint for the INT8 AUROC (default: untrained, smoke)")
    p.add_argument("--data-root", help="datasets folder (default: AMA_DATA_ROOT, else ../shared/datasets)")
    p.add_argument("--calib-images", type=int, default=512, help="normal images that calibrate INT8 and mu/sigma")
    p.add_argument("--limit-test", type=int, default=None, help="cap on the normal test images (default: all)")
    p.add_argument("--int8-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="a few iterations at tiny sizes to prove the script runs (writes no doc)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/runtime_bench.json)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.runtimes = [s for s in args.runtimes.split(",") if s]
    args.presets = [s for s in args.presets.split(",") if s]
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.batch_sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    bad = set(args.runtimes) - {"torch", *GRAPH_RUNTIMES}
    if bad or set(args.presets) - set(PRESETS):
        p.error(f"unknown runtimes {sorted(bad)} or presets {sorted(set(args.presets) - set(PRESETS))}")
    if args.smoke:
        given = sys.argv[1:] if argv is None else argv
        args.batch_sizes = args.batch_sizes[:2] if any(a.startswith("--batch-sizes") for a in given) else [1, 8]
        args.reps, args.warmup = 2, 1
        args.calib_images, args.limit_test = min(args.calib_images, 64), min(args.limit_test or 200, 200)
        args.no_doc = True
        args.out = args.out or Path(tempfile.gettempdir()) / "runtime_bench_smoke.json"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtimes, missing = available_runtimes(args.runtimes)
    result: dict = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "smoke": args.smoke,
        "command": " ".join(["python benchmarks/runtime_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "threads": args.threads, "runtimes": runtimes, "missing": missing, "versions": versions(),
    }
    for rt, why in missing.items():
        log(f"{rt}: {why}; not measured")
    with tempfile.TemporaryDirectory() as tmp:
        if "speed" in args.sections:
            result["speed"] = bench_speed(args, runtimes, Path(tmp))
        if "int8" in args.sections:
            result["int8"] = bench_int8(args, runtimes, Path(tmp))
    result["machine"] = machine(torch.device("cpu"))
    out = args.out or ROOT / "benchmarks" / "results" / "runtime_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    print(markdown(result))
    if not args.no_doc:
        write_doc(args.doc, markdown(result))
        log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
