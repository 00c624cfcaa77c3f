"""Comparison table and report files for a reference and two candidates."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mlflow_edge.errors import EdgeError
from mlflow_edge.report import comparison_table, write_report

ROWS = [
    {"name": "smol-q4", "backend": "llamacpp", "precision": "Q4_K_M", "role": "candidate", "size_mb": 105.5,
     "perplexity": 17.9, "decode_tok_s": 95.0, "speedup": 2.3, "accuracy_retention": 0.93, "gates": False},
    {"name": "smol-f16", "backend": "llamacpp", "precision": "F16", "role": "reference", "size_mb": 270.9,
     "perplexity": 16.7, "decode_tok_s": 41.0, "latency_cv": 0.02, "ignored_param": "x"},
    {"name": "smol-q8", "backend": "llamacpp", "precision": "Q8_0", "role": "candidate", "size_mb": 144.8,
     "perplexity": 16.8, "decode_tok_s": 70.1, "speedup": 1.71, "accuracy_retention": 0.994, "gates": "pass"},
]


def test_columns_and_order() -> None:
    table = comparison_table(ROWS)
    assert list(table.columns) == [
        "name", "backend", "precision", "role",
        "size_mb", "decode_tok_s", "latency_cv", "perplexity", "accuracy_retention", "speedup",
        "gates",
    ]
    assert list(table["name"]) == ["smol-f16", "smol-q4", "smol-q8"]  # reference first, then by size
    assert table.loc[0, "role"] == "reference"
    assert list(table["gates"].iloc[1:]) == ["fail", "pass"]
    assert pd.isna(table.loc[0, "speedup"]) and table["size_mb"].dtype == float


def test_without_reference_or_gates() -> None:
    table = comparison_table([r for r in ROWS if r["role"] != "reference"])
    assert list(table["name"]) == ["smol-q4", "smol-q8"]
    assert "gates" in table.columns
    table = comparison_table([{k: v for k, v in ROWS[1].items() if k != "gates"}])
    assert "gates" not in table.columns


def test_write_report(tmp_path: Path) -> None:
    table = comparison_table(ROWS)
    paths = write_report(table, tmp_path / "out")
    assert [p.name for p in paths] == ["comparison.csv", "comparison.html", "tradeoffs.png"]
    assert all(p.is_file() for p in paths)

    back = pd.read_csv(paths[0])
    pd.testing.assert_frame_equal(back, table)

    page = paths[1].read_text()
    assert "<h1>mlflow-edge comparison</h1>" in page and "<table" in page
    assert ">270.9<" in page and ">0.994<" in page and "Q4_K_M" in page

    png = paths[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 20_000


def test_plot_without_quality_metrics(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "perplexity"} for r in ROWS]
    png = write_report(comparison_table(rows), tmp_path)[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_table_refused(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="no rows"):
        write_report(comparison_table([]), tmp_path)
