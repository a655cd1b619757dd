"""benchmarks/quality_table.py: the mean +- std rows docs/results.md quotes, baselines included."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("quality_table", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(variant, seed, auroc_r, **extra):
    return {"date": "2026-12-03", "preset": "p", "variant": variant, "seed": seed, "steps": 500,
            "wall_s": 60.0, "auroc_r": auroc_r, "recall_upper@0.01": 0.5, **extra}


def test_mean_std_over_seeds_with_nested_baselines_and_newest_row_winning(table, tmp_path):
    rows = [_row("v", 0, 0.10),  # superseded by the re-run of seed 0 below
            _row("v", 0, 0.90, pca={"auroc": 0.80}, autoencoder={"auroc": 0.70}),
            _row("v", 1, 0.94, pca={"auroc": 0.84}),
            _row("v", 2, 0.92, holdout={"auroc_r": 0.5}),
            _row("other", 0, 0.5)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [s] = table.summarise(table.load(path, "p", None), ["v"])
    assert s["seeds"] == [0, 1, 2]
    assert s["cells"]["auroc_r"] == (pytest.approx(0.92), pytest.approx(0.016330, abs=1e-6), 3)
    assert s["cells"]["pca/auroc"] == (pytest.approx(0.82), pytest.approx(0.02), 2)
    assert s["cells"]["autoencoder/auroc"] == (pytest.approx(0.70), 0.0, 1)
    assert s["cells"]["holdout/auroc_r"][2] == 1
    assert s["cells"]["auroc_a"] is None
    assert s["cells"]["recall_upper@0.01"] == (0.5, 0.0, 3)  # a dot in a plain key is not a path
    text = table.markdown([s])
    assert "0.920 +- 0.016" in text and "| 0.820 +- 0.020 |" in text


def test_value_walks_nested_keys_and_tolerates_gaps(table):
    assert table.value({"pca": {"auroc": 0.7}}, "pca/auroc") == 0.7
    assert table.value({"pca": None}, "pca/auroc") is None
    assert table.value({"auroc_r": 0.9}, "holdout/auroc_r") is None
