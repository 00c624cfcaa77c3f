"""2-D Pareto plots of a search, every point labelled: a PNG (matplotlib) and an offline HTML (plotly) per pair.

Infeasible trials are light grey, feasible ones take their backend's colour (the first word of the label), the
study's front is drawn larger and joined by the staircase of its 2-D front, and the champion is a star.
Units and directions come from the metric catalogue.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import matplotlib
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from mlflow_edge.backends import get_backend
from mlflow_edge.backends.base import OptionSpec
from mlflow_edge.metrics import BY_NAME

FRONT_PLOTS: tuple[tuple[str, str], ...] = (("size_mb", "kld_mean"), ("size_mb", "decode_tok_s"))
"""(x, y) metric pairs drawn; the fidelity y falls back to accuracy_retention when kld_mean is absent."""

FALLBACK_Y: dict[str, str] = {"kld_mean": "accuracy_retention"}
LOG_SCALE_METRICS = frozenset({"kld_mean"})
LOG_SCALE_SPAN = 20.0
READABLE: dict[str, tuple[str, str]] = {  # metric -> (name in a title, name on an axis)
    "size_mb": ("size", "size"),
    "kld_mean": ("mean KLD", "mean KLD vs reference"),
    "decode_tok_s": ("decode speed", "decode"),
    "accuracy_retention": ("accuracy retention", "accuracy retention"),
}
UNITLESS = frozenset({"ratio", "-"})
INFEASIBLE_GREY = "#bdbdbd"
CHAMPION_COLOUR = "#d62728"
MPL_MARKERS = {"circle": "o", "star": "*"}


def point_label(backend: str, precision: str, options: Mapping[str, Any]) -> str:
    """Short readable label: backend, precision, then the options that tell trials apart (in their order), each as
    its backend's :class:`~mlflow_edge.backends.base.OptionSpec` says (``label``)."""
    specs = option_specs(backend)
    words = [option_word(key, value, specs.get(key)) for key, value in options.items()]
    return " ".join([backend, precision] + [word for word in words if word])


def option_specs(backend: str) -> dict[str, OptionSpec]:
    """The backend's options by name; none for a backend that is not registered or does not load here."""
    try:
        return {spec.name: spec for spec in get_backend(backend).option_specs()}
    except Exception:  # a label is no reason to fail a report: the options then show as name=value
        return {}


def option_word(key: str, value: Any, spec: OptionSpec | None = None) -> str | None:
    """One option as a label word, or None when it is unset, off, calibration detail or left out by its spec."""
    if key.startswith("calib."):
        return None
    return (spec or OptionSpec(key, object)).label_word(value)


def write_front_plots(points: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """Write one PNG + one HTML per pair of FRONT_PLOTS that has data, return the written paths."""
    written: list[Path] = []
    pairs = drawn_pairs(points)
    if pairs:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    colours = backend_colours(points)
    for x, y in pairs:
        rows = finite_rows(points, x, y)
        stem = Path(out_dir) / f"front_{x}_vs_{y}"
        pair_title = f"{title}: {READABLE.get(x, (x,))[0]} vs {READABLE.get(y, (y,))[0]}"
        groups = point_groups(rows, colours)
        written.append(write_png(rows, groups, x, y, pair_title, stem.with_suffix(".png")))
        written.append(write_html(rows, groups, x, y, pair_title, stem.with_suffix(".html")))
    return written


def drawn_pairs(points: pd.DataFrame) -> list[tuple[str, str]]:
    """The pairs with at least one point, the fidelity metric replaced by its fallback where it has none."""
    pairs = []
    for x, y in FRONT_PLOTS:
        if finite_rows(points, x, y).empty and y in FALLBACK_Y:
            y = FALLBACK_Y[y]
        if not finite_rows(points, x, y).empty:
            pairs.append((x, y))
    return pairs


def finite_rows(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows where both metrics are finite numbers (none when a column is missing)."""
    if x not in points.columns or y not in points.columns:
        return points.iloc[0:0]
    both = points[[x, y]].apply(pd.to_numeric, errors="coerce")
    return points[np.isfinite(both).all(axis=1)]


def backend_colours(points: pd.DataFrame) -> dict[str, str]:
    """One colour per backend (first word of the label), stable across the pairs of one study."""
    palette = matplotlib.colormaps["tab10"]
    backends = sorted({backend_of(label) for label in points.get("label", [])})
    return {backend: to_hex(palette(i % palette.N)) for i, backend in enumerate(backends)}


def backend_of(label: str) -> str:
    return str(label).split(" ", 1)[0]


@dataclasses.dataclass(frozen=True)
class PointGroup:
    """Points drawn alike: one legend entry."""

    name: str
    rows: pd.DataFrame
    colour: str
    size: float  # marker diameter in points
    symbol: str  # plotly symbol; MPL_MARKERS maps it for matplotlib
    text_shown: bool  # label always visible in the HTML (else on hover)


def point_groups(rows: pd.DataFrame, colours: Mapping[str, str]) -> list[PointGroup]:
    """Infeasible, then per backend feasible and front, then the champion (each drawn over the previous)."""
    champion = rows["champion"].astype(bool)
    front = rows["on_front"].astype(bool) & ~champion
    feasible = rows["feasible"].astype(bool) & ~front & ~champion
    backends = rows["label"].map(backend_of)
    groups = [PointGroup("infeasible", rows[~(feasible | front | champion)], INFEASIBLE_GREY, 5, "circle", False)]
    for backend in sorted(set(backends)):
        groups.append(PointGroup(backend, rows[feasible & (backends == backend)], colours[backend], 7, "circle", False))
    for backend in sorted(set(backends)):
        name = f"{backend} (front)"
        groups.append(PointGroup(name, rows[front & (backends == backend)], colours[backend], 10, "circle", True))
    groups.append(PointGroup("champion", rows[champion], CHAMPION_COLOUR, 16, "star", True))
    return [group for group in groups if not group.rows.empty]


def front_staircase(rows: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The front points not dominated in this 2-D view, in x order (best x first)."""
    x_lower, y_lower = (BY_NAME[m].better == "lower" if m in BY_NAME else True for m in (x, y))
    front = rows[rows["on_front"].astype(bool)].sort_values([x, y], ascending=[x_lower, y_lower])
    kept, best_y = [], None
    for index, value in front[y].items():
        if best_y is None or (value < best_y if y_lower else value > best_y):
            kept.append(index)
            best_y = value
    return front.loc[kept]


def error_bars(rows: pd.DataFrame, y: str) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """The rows with a finite interval ``<y>_lo``..``<y>_hi``, and the distances below and above each value."""
    low, high = f"{y}_lo", f"{y}_hi"
    if low not in rows.columns or high not in rows.columns:
        return rows.iloc[0:0], pd.Series(dtype=float), pd.Series(dtype=float)
    bounded = finite_rows(rows, low, high)
    below = (bounded[y] - bounded[low]).clip(lower=0)
    above = (bounded[high] - bounded[y]).clip(lower=0)
    return bounded, below, above


def axis_title(metric: str, is_y: bool) -> str:
    """Readable name with the catalogue's unit; the y axis also says which direction is better."""
    name = READABLE.get(metric, (metric, metric))[1]
    spec = BY_NAME.get(metric)
    details = [spec.unit] if spec and spec.unit not in UNITLESS else []
    if spec and is_y:
        details.append(f"{spec.better} is better")
    return f"{name} ({', '.join(details)})" if details else name


def log_scale(rows: pd.DataFrame, y: str) -> bool:
    """Log y for a metric that spans orders of magnitude (all positive, more than LOG_SCALE_SPAN apart)."""
    values = rows[y].astype(float)
    return y in LOG_SCALE_METRICS and bool((values > 0).all()) and values.max() > LOG_SCALE_SPAN * values.min()


def hover_text(rows: pd.DataFrame) -> list[str]:
    return [f"#{int(trial)} {label}" for trial, label in zip(rows["trial"], rows["label"])]


def write_png(rows: pd.DataFrame, groups: list[PointGroup], x: str, y: str, title: str, path: Path) -> Path:
    """A static scatter with every point annotated; a bare Figure, so no pyplot state to close or leak."""
    figure = Figure(figsize=(9, 6))
    axes = figure.add_subplot()
    bounded, below, above = error_bars(rows, y)
    axes.errorbar(bounded[x], bounded[y], yerr=[below, above], fmt="none", ecolor="0.55", elinewidth=0.8, capsize=2)
    staircase = front_staircase(rows, x, y)
    if len(staircase) > 1:
        axes.step(staircase[x], staircase[y], where="post", color="0.3", linewidth=1, linestyle="--", label="2-D front")
    for group in groups:
        axes.scatter(group.rows[x], group.rows[y], s=group.size**2, c=group.colour, marker=MPL_MARKERS[group.symbol],
                     label=group.name, edgecolors="black" if group.text_shown else "none", linewidths=0.5, zorder=3)
        for text, px, py in zip(hover_text(group.rows), group.rows[x], group.rows[y]):
            axes.annotate(text, (px, py), xytext=(4, 4), textcoords="offset points", fontsize=6, color="0.2")
    if log_scale(rows, y):
        axes.set_yscale("log")
    axes.set(xlabel=axis_title(x, False), ylabel=axis_title(y, True), title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_html(rows: pd.DataFrame, groups: list[PointGroup], x: str, y: str, title: str, path: Path) -> Path:
    """An interactive scatter: every label on hover, front and champion labels always shown; opens offline."""
    figure = go.Figure()
    bounded, below, above = error_bars(rows, y)
    if not bounded.empty:
        figure.add_trace(go.Scatter(x=bounded[x], y=bounded[y], mode="markers", marker={"opacity": 0},
                                    error_y={"type": "data", "symmetric": False, "array": above, "arrayminus": below,
                                             "color": "#8c8c8c"}, hoverinfo="skip", showlegend=False))
    staircase = front_staircase(rows, x, y)
    if len(staircase) > 1:
        line = {"shape": "hv", "dash": "dash", "color": "#4d4d4d", "width": 1}
        figure.add_trace(go.Scatter(x=staircase[x], y=staircase[y], mode="lines", line=line, name="2-D front",
                                    hoverinfo="skip"))
    for group in groups:
        labels = hover_text(group.rows)
        figure.add_trace(go.Scatter(
            x=group.rows[x], y=group.rows[y], name=group.name, hovertext=labels,
            mode="markers+text" if group.text_shown else "markers", text=labels if group.text_shown else None,
            textposition="top right", textfont={"size": 10},
            marker={"color": group.colour, "size": group.size, "symbol": group.symbol},
            hovertemplate=f"%{{hovertext}}<br>{x}=%{{x}}<br>{y}=%{{y}}<extra>{group.name}</extra>"))
    figure.update_layout(title=title, xaxis_title=axis_title(x, False), yaxis_title=axis_title(y, True),
                         template="plotly_white")
    if log_scale(rows, y):
        figure.update_yaxes(type="log")
    figure.write_html(path, include_plotlyjs=True)
    return path
