"""Speed of the custom ops and of the whole Scorer; writes JSON and a markdown table.

    python benchmarks/ops_bench.py                       # CPU: everything, about 15-25 minutes on 2 cores
    python benchmarks/ops_bench.py --quick               # smaller sweep, a few minutes
    python benchmarks/ops_bench.py --device cuda --precision bfloat16 --sizes 32 --batch-sizes 256,1024

Sections:
- tail: the fused pair_rscore against its pure-PyTorch twin on the same tensor, timed alternately in
  one process; the ratio is median(twin) / median(fused).
- sampler: shell_sample compiled against its twin, the same way.
- scorer: whole-Scorer frames/s (E, G, critic over the stacked 2B batch, fused tail) for random
  checkpoints with the paper's widths and a narrow CPU preset, and the share of that time the
  tail takes (so the end-to-end value of the fused tail is stated honestly).
- options: the Scorer's speed options (channels_last, autocast, torch.compile) at one batch size.

Results go to benchmarks/results/ops_bench_<device>.json and replace this device's block in
docs/benchmarks.md (between <!-- ops_bench:<device>:begin --> and <!-- ops_bench:<device>:end -->).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ama_stream import ops
from ama_stream.checkpoint import Checkpoint, save_checkpoint
from ama_stream.model import AMA, ModelConfig
from ama_stream.preprocess import PreprocessSpec
from ama_stream.scoring import Scorer

ROOT = Path(__file__).resolve().parent.parent
DOC_TITLE = "# Benchmarks\n\nMeasured numbers, each table written by the script named in its section.\n"
SECTION_TITLE = "## Custom ops and Scorer speed (benchmarks/ops_bench.py)"


@dataclass(frozen=True)
class Preset:
    name: str
    enc: int
    gen: int
    disc: int
    nz: int


PRESETS = {
    "paper": Preset("paper", enc=64, gen=256, disc=128, nz=128),
    "narrow": Preset("narrow", enc=32, gen=64, disc=64, nz=64),
}


# --- timing ----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in turn (a, b, a, b, ...) so background load hits both alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def repeat_for(fn: Callable[[], object], device: torch.device, min_seconds: float, max_reps: int) -> tuple[float, int]:
    """Median seconds per call over at least one call, repeating until min_seconds have passed."""
    times: list[float] = []
    while len(times) < max_reps and (not times or sum(times) < min_seconds):
        times.append(timed(fn, device))
    return statistics.median(times), len(times)


# --- sections --------------------------------------------------------------------------------------

TAIL_CASES = [  # (h shape [2B, C, H, W], dtype, layout)
    ((1024, 128, 8, 8), torch.float32, "contiguous"),
    ((1024, 128, 8, 8), torch.float32, "channels_last"),
    ((1024, 128, 8, 8), torch.bfloat16, "contiguous"),
    ((1024, 128, 8, 8), torch.bfloat16, "channels_last"),
    ((1024, 128, 8, 8), torch.float16, "contiguous"),
    ((2048, 128, 8, 8), torch.float32, "contiguous"),
    ((512, 64, 8, 8), torch.float32, "channels_last"),
    ((2, 128, 8, 8), torch.float32, "contiguous"),
    ((128, 256, 16, 16), torch.float32, "contiguous"),
]


def bench_tail(device: torch.device, reps: int, quick: bool) -> list[dict]:
    rows = []
    cases = TAIL_CASES[:4] if quick else TAIL_CASES
    gen = torch.Generator().manual_seed(0)
    for shape, dtype, layout in cases:
        h = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        if layout == "channels_last":
            h = h.contiguous(memory_format=torch.channels_last)
        med = alternate(
            {"fused": lambda: ops.pair_rscore(h), "twin": lambda: ops.pair_rscore_reference(h)},
            device, reps,
        )
        rows.append({
            "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "layout": layout,
            "fused_ms": med["fused"] * 1e3, "twin_ms": med["twin"] * 1e3, "ratio": med["twin"] / med["fused"],
        })
        print(f"tail {shape} {rows[-1]['dtype']} {layout}: fused {rows[-1]['fused_ms']:.3f} ms, "
              f"twin {rows[-1]['twin_ms']:.3f} ms, x{rows[-1]['ratio']:.2f}", file=sys.stderr)
    return rows


def bench_sampler(device: torch.device, reps: int) -> list[dict]:
    rows = []
    for n, d in ((256, 128), (4096, 512)):
        r_in, r_out = 0.9 * math.sqrt(d), 1.1 * math.sqrt(d)
        med = alternate(
            {
                "fused": lambda: ops.shell_sample(n, d, r_in, r_out, device=device),
                "twin": lambda: ops.shell_sample_reference(n, d, r_in, r_out, device=device),
            },
            device, reps,
        )
        rows.append({"n": n, "d": d, "fused_ms": med["fused"] * 1e3, "twin_ms": med["twin"] * 1e3,
                     "ratio": med["twin"] / med["fused"]})
        print(f"sampler n={n} d={d}: x{rows[-1]['ratio']:.2f}", file=sys.stderr)
    return rows


def make_checkpoint(preset: Preset, image_size: int, channels: int, folder: Path) -> Path:
    """A randomly initialised checkpoint, saved and loaded the way the agent loads a trained one."""
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=image_size, channels=channels, nz=preset.nz, enc_width=preset.enc,
                      gen_width=preset.gen, disc_width=preset.disc)
    ckpt = Checkpoint(model=cfg, preprocess=PreprocessSpec(image_size=image_size, channels=channels),
                      state_dict=AMA(cfg).state_dict(), mu=100.0, sigma=10.0)
    path = folder / f"{preset.name}-{image_size}.pt"
    save_checkpoint(ckpt, path)
    return path


def bench_scorer(device: torch.device, args: argparse.Namespace, folder: Path) -> list[dict]:
    rows = []
    for preset_name in args.presets:
        for size in args.sizes:
            path = make_checkpoint(PRESETS[preset_name], size, args.channels, folder)
            scorer = Scorer(path, device, precision=args.precision)
            fps_seen = None
            for batch in args.batch_sizes:
                row = {"preset": preset_name, "image_size": size, "batch": batch, "precision": args.precision,
                       "channels_last": scorer.channels_last}
                expected = batch / fps_seen if fps_seen else 0.0
                if expected > args.max_batch_seconds:
                    row["skipped"] = (f"about {expected:.0f} s per batch at {fps_seen:.1f} frames/s "
                                      f"(> {args.max_batch_seconds:.0f} s)")
                    rows.append(row)
                    print(f"scorer {preset_name} {size} b={batch}: skipped ({row['skipped']})", file=sys.stderr)
                    continue
                x = torch.rand(batch, args.channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
                scorer.score_tensor(x[: min(batch, 16)])  # warm-up (allocator, oneDNN/cuDNN plans)
                if batch <= 64:
                    scorer.score_tensor(x)
                total, n_total = repeat_for(lambda: scorer.score_tensor(x), device, args.min_seconds, 5)
                h = scorer.feature_map(x)
                med = alternate(
                    {"fused": lambda: ops.pair_rscore(h), "twin": lambda: ops.pair_rscore_reference(h)},
                    device, reps=max(3, args.reps // 2), warmup=1,
                )
                fps_seen = batch / total
                row.update({
                    "frames_per_s": fps_seen, "batch_ms": total * 1e3, "runs": n_total,
                    "tail_ms": med["fused"] * 1e3, "twin_tail_ms": med["twin"] * 1e3,
                    "tail_share": med["fused"] / total,
                    # what the same Scorer would do with the twin tail instead of the fused one
                    "frames_per_s_with_twin_tail": batch / (total - med["fused"] + med["twin"]),
                })
                rows.append(row)
                print(f"scorer {preset_name} {size} b={batch}: {fps_seen:.1f} frames/s, tail {100 * row['tail_share']:.2f}%",
                      file=sys.stderr)
            del scorer
    return rows


def bench_options(device: torch.device, args: argparse.Namespace, folder: Path) -> list[dict]:
    """Each speed option against the plain float32 NCHW eager Scorer, alternately, at one batch size."""
    rows = []
    batch, size = args.options_batch, 32
    variants = {
        "float32, NCHW (plain)": {"channels_last": False},
        "float32, channels_last": {"channels_last": True},
        "bfloat16 autocast, channels_last": {"channels_last": True, "precision": "bfloat16"},
    }
    if not args.no_compile:
        variants["float32, channels_last, torch.compile"] = {"channels_last": True, "compile_mode": "default"}
        if device.type == "cuda":
            variants["bfloat16, channels_last, torch.compile reduce-overhead (CUDA graphs)"] = {
                "channels_last": True, "precision": "bfloat16", "compile_mode": "reduce-overhead"}
    for preset_name in args.presets:
        path = make_checkpoint(PRESETS[preset_name], size, args.channels, folder)
        x = torch.rand(batch, args.channels, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
        scorers, setup_s = {}, {}
        for name, kwargs in variants.items():
            start = time.perf_counter()
            scorers[name] = Scorer(path, device, **kwargs)
            scorers[name].score_tensor(x)  # compiles when asked to
            setup_s[name] = time.perf_counter() - start
        med = alternate({name: (lambda s=s: s.score_tensor(x)) for name, s in scorers.items()}, device,
                        reps=args.option_reps, warmup=1)
        base = med["float32, NCHW (plain)"]
        for name in variants:
            rows.append({"preset": preset_name, "image_size": size, "batch": batch, "variant": name,
                         "frames_per_s": batch / med[name], "speedup": base / med[name], "first_call_s": setup_s[name]})
            print(f"options {preset_name} {name}: x{base / med[name]:.2f}", file=sys.stderr)
        del scorers
    return rows


# --- report ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(), "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "ops_backend": ops.backend(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def markdown(result: dict) -> str:
    m, dev = result["machine"], result["device"]
    lines = [
        f"### {dev.upper()}: {m.get('gpu', m['cpu'])} ({m['cpu_count']} CPU cores, "
        f"{m['torch_threads']} torch threads, ATen {m['cpu_capability']}), torch {m['torch']}, ops backend "
        f"`{m['ops_backend']}`; {result['created_at']}"
        + (f", 1-min load average {m['load_average_1m']:.1f} at the end" if "load_average_1m" in m else ""),
        "",
    ]
    if result.get("tail"):
        lines += ["Fused `pair_rscore` against its pure-PyTorch twin (same tensor, alternated runs, medians):", "",
                  "| h [2B, C, H, W] | dtype | layout | fused ms | twin ms | twin / fused |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['fused_ms']:.3f} | "
                  f"{r['twin_ms']:.3f} | **{r['ratio']:.1f}x** |" for r in result["tail"]]
        lines.append("")
    if result.get("sampler"):
        lines += ["`shell_sample` compiled against its twin:", "", "| n | d | fused ms | twin ms | twin / fused |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['n']} | {r['d']} | {r['fused_ms']:.3f} | {r['twin_ms']:.3f} | {r['ratio']:.1f}x |"
                  for r in result["sampler"]]
        lines.append("")
    if result.get("scorer"):
        lines += ["Whole Scorer (`score_tensor`: E, G, critic on the stacked 2B batch, fused tail), random checkpoints, "
                  f"{result['channels']} channels; `tail %` is the fused tail's share of the batch time, the last "
                  "column the same Scorer with the twin tail:", "",
                  "| preset | size | batch | precision | channels_last | frames/s | batch ms | tail % "
                  "| frames/s, twin tail |",
                  "|---|---:|---:|---|---|---:|---:|---:|---:|"]
        for r in result["scorer"]:
            head = f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['precision']} | {r['channels_last']} |"
            if "skipped" in r:
                lines.append(f"{head} skipped: {r['skipped']} | | | |")
            else:
                lines.append(f"{head} {r['frames_per_s']:.1f} | {r['batch_ms']:.0f} | {100 * r['tail_share']:.2f} | "
                             f"{r['frames_per_s_with_twin_tail']:.1f} |")
        lines.append("")
    if result.get("options"):
        lines += ["Scorer speed options at one batch size (alternated runs; speedup against plain float32 NCHW eager; "
                  "`first call s` includes any compilation):", "",
                  "| preset | size | batch | variant | frames/s | speedup | first call s |",
                  "|---|---:|---:|---|---:|---:|---:|"]
        lines += [f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['variant']} | {r['frames_per_s']:.1f} | "
                  f"{r['speedup']:.2f}x | {r['first_call_s']:.1f} |" for r in result["options"]]
        lines.append("")
    lines.append(f"Command: `{result['command']}`")
    return "\n".join(lines)


def write_doc(doc: Path, device: str, block: str) -> None:
    """Replace this device's generated block in the ops section, creating the file or section if needed."""
    begin, end = f"<!-- ops_bench:{device}:begin -->", f"<!-- ops_bench:{device}:end -->"
    text = doc.read_text() if doc.exists() else DOC_TITLE
    if SECTION_TITLE not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION_TITLE}\n"
    generated = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + generated + text[text.index(end) + len(end):]
    else:  # new block right after the section title
        at = text.index(SECTION_TITLE) + len(SECTION_TITLE)
        text = text[:at] + f"\n\n{generated}\n" + text[at:]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer tail shapes, narrow preset and batch <= 256 only")
    p.add_argument("--sections", default="tail,sampler,scorer,options")
    p.add_argument("--presets", default="paper,narrow")
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--batch-sizes", default="1,16,64,256,1024")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--precision", default="float32", help="Scorer precision for the scorer section")
    p.add_argument("--reps", type=int, default=15, help="alternated runs per tail/sampler measurement")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each Scorer point for at least this long")
    p.add_argument("--max-batch-seconds", type=float, default=60.0,
                   help="skip a Scorer batch predicted (from the previous batch size) to take longer than this")
    p.add_argument("--options-batch", type=int, default=16)
    p.add_argument("--option-reps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the options section")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ops_bench_<device>.json)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.presets = [s for s in args.presets.split(",") if s]
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.batch_sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    unknown = set(args.presets) - set(PRESETS)
    if unknown:
        p.error(f"unknown presets {sorted(unknown)}; choose from {sorted(PRESETS)}")
    if args.quick:
        args.presets = [pr for pr in args.presets if pr == "narrow"] or ["narrow"]
        args.batch_sizes = [b for b in args.batch_sizes if b <= 256]
        args.reps = min(args.reps, 7)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    result: dict = {
        "device": device.type, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/ops_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "channels": args.channels,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "tail" in args.sections:
            result["tail"] = bench_tail(device, args.reps, args.quick)
        if "sampler" in args.sections:
            result["sampler"] = bench_sampler(device, args.reps)
        if "scorer" in args.sections:
            result["scorer"] = bench_scorer(device, args, Path(tmp))
        if "options" in args.sections:
            result["options"] = bench_options(device, args, Path(tmp))
    result["machine"] = machine(device)
    out = args.out or ROOT / "benchmarks" / "results" / f"ops_bench_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_doc:
        write_doc(args.doc, device.type, markdown(result))
        print(f"updated {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
