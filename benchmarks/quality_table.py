"""Summarise benchmarks/results/quality.jsonl as markdown: one row per (preset, variant), mean +- std
(population std) over the seeds recorded, so docs/results.md quotes numbers it can be traced back to.

    python benchmarks/quality_table.py --preset fmnist_vs_mnist_cpu --variant "interp only" --variant "abl cube"
    python benchmarks/quality_table.py --preset fmnist_vs_mnist_cpu --since 2026-12-03

Rows of the same variant and seed recorded more than once keep the newest. Not a test: it reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESULTS_JSONL = Path(__file__).resolve().parent / "results" / "quality.jsonl"
COLUMNS = (("auroc_a", "AUROC A"), ("auroc_r", "AUROC R"), ("aupr_r", "AUPR R"),
           ("recall_upper@0.01", "recall @1%"), ("far_upper@0.01", "FAR @1%"), ("recall_upper@0.001", "recall @0.1%"),
           ("holdout/auroc_r", "hold-out R"), ("pca/auroc", "PCA"), ("autoencoder/auroc", "autoencoder"))


def value(row: dict, key: str):
    """row[key], where a key with slashes walks into nested records ("pca/auroc"); None if absent."""
    for part in key.split("/"):
        if not isinstance(row, dict) or row.get(part) is None:
            return None
        row = row[part]
    return row


def load(path: Path, preset: str | None, since: str | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if (preset is None or r["preset"] == preset) and (since is None or r["date"] >= since)]


def summarise(rows: list[dict], variants: list[str] | None) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for r in rows:  # file order is time order: the newest row of a (variant, seed) wins
        latest[(r["preset"], r["variant"], r["seed"])] = r
    groups: dict[tuple, list[dict]] = {}
    for (preset, variant, _), r in latest.items():
        if variants is None or variant in variants:
            groups.setdefault((preset, variant), []).append(r)
    order = variants or sorted({v for _, v in groups})
    out = []
    for preset, variant in sorted(groups, key=lambda k: (k[0], order.index(k[1]))):
        rs = sorted(groups[(preset, variant)], key=lambda r: r["seed"])
        cells = {}
        for key, _ in COLUMNS:
            values = np.array([v for r in rs if (v := value(r, key)) is not None], dtype=float)
            cells[key] = (values.mean(), values.std(), len(values)) if len(values) else None
        minutes = [r["wall_s"] / 60 for r in rs]
        out.append({"preset": preset, "variant": variant, "seeds": [r["seed"] for r in rs], "cells": cells,
                    "minutes": (min(minutes), max(minutes)), "steps": rs[0]["steps"]})
    return out


def markdown(summary: list[dict]) -> str:
    head = "| preset | variant | seeds | steps | " + " | ".join(title for _, title in COLUMNS) + " | wall |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 5)]
    for s in summary:
        cells = []
        for key, _ in COLUMNS:
            c = s["cells"][key]
            cells.append("-" if c is None else (f"{c[0]:.3f} +- {c[1]:.3f}" if c[2] > 1 else f"{c[0]:.3f}"))
        seeds = ",".join(map(str, s["seeds"]))
        wall = f"{s['minutes'][0]:.1f}-{s['minutes'][1]:.1f} min"
        lines.append(f"| {s['preset']} | {s['variant']} | {seeds} | {s['steps']} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset")
    p.add_argument("--variant", action="append", help="variants to show, in this order (default: all)")
    p.add_argument("--since", help="only rows recorded on or after this date (YYYY-MM-DD)")
    p.add_argument("--results", default=str(RESULTS_JSONL))
    args = p.parse_args()
    print(markdown(summarise(load(Path(args.results), args.preset, args.since), args.variant)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
