"""Side-by-side comparison of evaluated artifacts: a table (CSV, HTML) and a size/quality/speed trade-off plot.

Example::

    table = comparison_table([
        {"name": "ref", "backend": "transformers", "precision": "fp32", "role": "reference", "size_mb": 270.9, ...},
        {"name": "q4", "backend": "<backend>", "precision": "q4", "role": "candidate", "size_mb": 105.5, ...},
    ])
    write_report(table, Path("report"))  # comparison.csv, comparison.html, tradeoffs.png
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlflow_edge.errors import EdgeError
from mlflow_edge.metrics import METRICS

ID_COLUMNS: tuple[str, ...] = ("name", "backend", "precision", "role")

# Decimals shown in the HTML table per metric (the CSV keeps full precision).
_DECIMALS: dict[str, int] = {
    "size_mb": 1,
    "compression_ratio": 2,
    "bits_per_weight": 2,
    "load_s": 2,
    "prefill_tok_s": 1,
    "decode_tok_s": 1,
    "ttft_ms": 1,
    "latency_ms_p50": 1,
    "latency_ms_p95": 1,
    "latency_cv": 3,
    "peak_rss_mb": 1,
    "perplexity": 3,
    "kld_mean": 4,
    "kld_p99": 4,
    "top1_agreement": 3,
    "accuracy_retention": 3,
    "speedup": 2,
    "memory_reduction": 3,
}


def _gate_value(value: Any) -> Any:
    """``pass``/``fail`` for a bool or an object with ``.passed`` (a GateReport); strings and None as given."""
    if isinstance(value, bool):
        return "pass" if value else "fail"
    if hasattr(value, "passed"):
        return "pass" if value.passed else "fail"
    return value


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per artifact: ``name, backend, precision, role``, the CONVENTIONS metrics present in any row (in
    CONVENTIONS order), then ``gates`` if any row has it. The reference comes first, then by ``size_mb`` ascending.
    Other keys of ``rows`` are ignored."""
    metrics = [m for m in METRICS if any(m in row for row in rows)]
    columns = [*ID_COLUMNS, *metrics] + (["gates"] if any("gates" in row for row in rows) else [])
    table = pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=columns)
    for m in metrics:
        table[m] = pd.to_numeric(table[m], errors="coerce").astype(float)
    if "gates" in table:
        table["gates"] = table["gates"].map(_gate_value)
    order = pd.DataFrame({"ref": table["role"] != "reference"})
    if "size_mb" in table:
        order["size"] = table["size_mb"]
    order = order.sort_values(list(order.columns), na_position="last", kind="mergesort")
    return table.loc[order.index].reset_index(drop=True)


def _labels(table: pd.DataFrame) -> list[str]:
    """The precision of each row; ``precision (backend)`` where two rows share a precision."""
    precision = table["precision"].fillna(table["name"]).astype(str)
    dup = precision.duplicated(keep=False)
    return [f"{p} ({b})" if d else p for p, b, d in zip(precision, table["backend"].astype(str), dup)]


def _plot(table: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(12, 5), dpi=100)
    FigureCanvasAgg(fig)
    is_ref = (table["role"] == "reference").to_numpy()
    labels = _labels(table)
    panels = (
        ("perplexity", "perplexity (lower is better)", "size vs. quality"),
        ("decode_tok_s", "decode tokens/s (higher is better)", "size vs. decode speed"),
    )
    for ax, (metric, ylabel, title) in zip(fig.subplots(1, 2), panels):
        ax.set_title(title)
        ax.set_xlabel("size (MB)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if metric not in table or "size_mb" not in table or table[[metric, "size_mb"]].dropna().empty:
            ax.text(0.5, 0.5, f"no {metric} data", ha="center", va="center", transform=ax.transAxes)
            continue
        x, y = table["size_mb"].to_numpy(), table[metric].to_numpy()
        ax.scatter(x[~is_ref], y[~is_ref], s=40, color="tab:blue", label="candidate", zorder=3)
        if is_ref.any():
            ax.scatter(x[is_ref], y[is_ref], s=180, marker="*", color="tab:red", label="reference", zorder=4)
        for xi, yi, label in zip(x, y, labels):
            if pd.notna(xi) and pd.notna(yi):
                ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.margins(x=0.12, y=0.1)  # room for the labels
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(table: pd.DataFrame, out_dir: Path, title: str = "mlflow-edge comparison") -> list[Path]:
    """Write ``comparison.csv``, ``comparison.html`` and ``tradeoffs.png`` into ``out_dir``; return their paths."""
    if table.empty:
        raise EdgeError("nothing to report: the comparison table has no rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, html_path, png_path = out_dir / "comparison.csv", out_dir / "comparison.html", out_dir / "tradeoffs.png"

    table.to_csv(csv_path, index=False)

    formatters = {
        c: (lambda v, d=_DECIMALS[c]: "" if pd.isna(v) else f"{v:.{d}f}") for c in table.columns if c in _DECIMALS
    }
    body = table.to_html(index=False, formatters=formatters, na_rep="", border=0, classes="comparison")
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>\n"
        "<style>body{font-family:sans-serif} table{border-collapse:collapse} "
        "th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right} th{background:#f4f4f4}</style>"
        f"</head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n"
        f"<p><img src='{png_path.name}' alt='size vs. perplexity and decode speed'></p>\n</body></html>\n"
    )
    html_path.write_text(page, encoding="utf-8")

    _plot(table, png_path)
    return [csv_path, html_path, png_path]
