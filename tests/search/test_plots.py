"""The 2-D Pareto plots of a search: files per pair, labels, fallbacks, and the point labels themselves."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
from matplotlib import pyplot
from matplotlib.axes import Axes
from matplotlib.image import imread

from mlflow_edge.search.plots import (
    axis_title,
    finite_rows,
    front_staircase,
    log_scale,
    point_label,
    write_front_plots,
)

NAN = math.nan
FRONT_LABELS = ("#0 llamacpp Q4_K_M", "#1 llamacpp Q8_0", "#3 openvino INT4_ASYM g64 r0.8 awq")


def _points() -> pd.DataFrame:
    """Three backends, one infeasible trial, one champion, one pruned (no decode), intervals on two rows."""
    return pd.DataFrame({
        "trial": [0, 1, 2, 3, 4, 5],
        "label": ["llamacpp Q4_K_M", "llamacpp Q8_0", "llamacpp Q2_K", "openvino INT4_ASYM g64 r0.8 awq",
                  "openvino INT8_ASYM", "onnxruntime int4_rtn b32 asym"],
        "feasible": [True, True, False, True, True, True],
        "on_front": [True, True, False, True, False, False],
        "champion": [True, False, False, False, False, False],
        "size_mb": [400.0, 700.0, 250.0, 380.0, 800.0, 450.0],
        "kld_mean": [0.02, 0.002, 0.9, 0.05, 0.01, 0.08],
        "kld_mean_lo": [0.015, 0.001, NAN, NAN, NAN, NAN],
        "kld_mean_hi": [0.03, 0.004, NAN, NAN, NAN, NAN],
        "decode_tok_s": [50.0, 35.0, 60.0, 70.0, NAN, 40.0],
        "accuracy_retention": [0.97, 0.99, 0.6, 0.95, 0.98, 0.93],
    })


def _names(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


def _read_html(path: Path) -> str:
    """The page with plotly's JSON escapes (``\\u002f`` for ``/``) undone, so axis titles read as written."""
    return re.sub(r"\\u([0-9a-f]{4})", lambda match: chr(int(match.group(1), 16)), path.read_text())


def _plotted_texts(html: str) -> set[str]:
    """The labels shown on the plot (plotly's ``text`` arrays), as opposed to those only on hover."""
    shown = set()
    for array in re.findall(r'"text":\[([^\]]*)\]', html):
        shown.update(re.findall(r'"([^"]*)"', array))
    return shown


def test_both_pairs_write_a_png_and_an_html(tmp_path):
    written = write_front_plots(_points(), tmp_path / "plots", "demo study")
    assert _names(written) == ["front_size_mb_vs_kld_mean.png", "front_size_mb_vs_kld_mean.html",
                               "front_size_mb_vs_decode_tok_s.png", "front_size_mb_vs_decode_tok_s.html"]
    for path in written:
        assert path.is_file() and path.stat().st_size > 1000
    for png in written[::2]:
        height, width, channels = imread(png).shape
        assert height > 300 and width > 500 and channels in (3, 4)
    assert pyplot.get_fignums() == []


def test_html_shows_front_and_champion_labels_and_hovers_the_rest(tmp_path):
    written = write_front_plots(_points(), tmp_path, "demo study")
    html = _read_html(tmp_path / "front_size_mb_vs_kld_mean.html")
    shown = _plotted_texts(html)
    assert set(FRONT_LABELS) <= shown
    assert "#2 llamacpp Q2_K" not in shown and "#2 llamacpp Q2_K" in html  # infeasible: hover only
    assert '"name":"champion"' in html
    assert "demo study: size vs mean KLD" in html
    assert "mean KLD vs reference (nats, lower is better)" in html and "size (MB)" in html
    assert not re.search(r"<script[^>]*\bsrc=", html) and len(html) > 1_000_000  # plotly.js inlined: offline
    decode_html = _read_html(written[3])
    assert "#4 openvino INT8_ASYM" not in decode_html  # pruned: no decode speed, not drawn
    assert "decode (tokens/s, higher is better)" in decode_html


def test_png_annotates_every_plotted_point(tmp_path, monkeypatch):
    annotated = []
    original = Axes.annotate

    def recording_annotate(axes, text, *args, **kwargs):
        annotated.append(text)
        return original(axes, text, *args, **kwargs)

    monkeypatch.setattr(Axes, "annotate", recording_annotate)
    write_front_plots(_points().drop(columns=["decode_tok_s"]), tmp_path, "demo")
    points = _points()
    assert sorted(annotated) == sorted(f"#{trial} {label}" for trial, label in zip(points["trial"], points["label"]))


def test_without_decode_speed_only_the_fidelity_pair_is_drawn(tmp_path):
    written = write_front_plots(_points().drop(columns=["decode_tok_s"]), tmp_path, "accuracy only")
    assert _names(written) == ["front_size_mb_vs_kld_mean.png", "front_size_mb_vs_kld_mean.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(_names(written))


@pytest.mark.parametrize("without_kld", ["dropped", "all NaN"])
def test_without_kld_the_fidelity_pair_uses_accuracy_retention(tmp_path, without_kld):
    points = _points().drop(columns=["kld_mean", "kld_mean_lo", "kld_mean_hi"])
    if without_kld == "all NaN":
        points["kld_mean"] = NAN
    written = write_front_plots(points, tmp_path, "demo")
    assert _names(written)[:2] == ["front_size_mb_vs_accuracy_retention.png",
                                   "front_size_mb_vs_accuracy_retention.html"]
    assert len(written) == 4 and all(path.stat().st_size > 0 for path in written)
    assert "accuracy retention (higher is better)" in _read_html(written[1])


def test_an_empty_frame_writes_nothing(tmp_path):
    assert write_front_plots(pd.DataFrame(), tmp_path / "plots", "empty") == []
    assert write_front_plots(_points().iloc[0:0], tmp_path / "plots", "empty") == []
    assert not (tmp_path / "plots").exists()


def test_finite_rows_need_both_values():
    points = _points()
    assert list(finite_rows(points, "size_mb", "decode_tok_s")["trial"]) == [0, 1, 2, 3, 5]
    assert finite_rows(points, "size_mb", "top1_agreement").empty


def test_staircase_keeps_the_front_points_undominated_in_two_dimensions():
    points = _points()
    assert list(front_staircase(points, "size_mb", "kld_mean")["trial"]) == [3, 0, 1]
    assert list(front_staircase(points, "size_mb", "decode_tok_s")["trial"]) == [3]  # 3 is smaller and faster


def test_log_scale_only_for_kld_spanning_more_than_twenty_fold():
    points = _points()
    assert log_scale(points, "kld_mean")
    assert not log_scale(points[points["trial"].isin([0, 3])], "kld_mean")  # 0.02..0.05
    assert not log_scale(points.assign(kld_mean=[0.0, 0.002, 0.9, 0.05, 0.01, 0.08]), "kld_mean")
    assert not log_scale(points.assign(decode_tok_s=[1.0, 100.0, 2, 3, 4, 5]), "decode_tok_s")


def test_axis_titles_carry_units_and_the_y_direction():
    assert axis_title("size_mb", is_y=False) == "size (MB)"
    assert axis_title("kld_mean", is_y=True) == "mean KLD vs reference (nats, lower is better)"
    assert axis_title("decode_tok_s", is_y=True) == "decode (tokens/s, higher is better)"
    assert axis_title("accuracy_retention", is_y=True) == "accuracy retention (higher is better)"


@pytest.mark.parametrize(("backend", "precision", "options", "expected"), [
    ("llamacpp", "Q4_K_M", {}, "llamacpp Q4_K_M"),
    ("openvino", "INT4_ASYM",
     {"group_size": 64, "ratio": 0.8, "awq": True, "scale_estimation": False, "sensitivity_metric": None,
      "calib.samples": 32}, "openvino INT4_ASYM g64 r0.8 awq"),
    ("llamacpp", "Q4_K_M", {"imatrix": True, "imatrix_chunks": 16}, "llamacpp Q4_K_M imatrix"),
    ("onnxruntime", "int4_rtn", {"block_size": 32, "is_symmetric": False, "execution_provider": "CPUExecutionProvider"},
     "onnxruntime int4_rtn b32 asym"),
    ("onnxruntime", "int4_rtn", {"block_size": 128, "is_symmetric": True, "accuracy_level": 4},
     "onnxruntime int4_rtn b128 accuracy_level=4"),
    ("mlx", "4bit", {"q_group_size": 32, "dtype": "float16", "ratio": NAN}, "mlx 4bit g32 dtype=float16"),
])
def test_point_label(backend, precision, options, expected):
    assert point_label(backend, precision, options) == expected
