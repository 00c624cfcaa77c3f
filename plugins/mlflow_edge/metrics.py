"""The metric catalogue of CONVENTIONS.md: names, units and which direction is better. No other module lists them."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    better: Literal["higher", "lower"]
    hardware: bool  # measured only on the target's hardware (timings, memory); else any machine computes it
    per_artifact: bool = True  # False: a figure of a whole search (on the study's parent run)


CATALOGUE: tuple[Metric, ...] = (
    Metric("size_mb", "MB", "lower", False),
    Metric("compression_ratio", "x", "higher", False),
    Metric("bits_per_weight", "bits", "lower", False),
    Metric("load_s", "s", "lower", True),
    Metric("prefill_tok_s", "tokens/s", "higher", True),
    Metric("decode_tok_s", "tokens/s", "higher", True),
    Metric("ttft_ms", "ms", "lower", True),
    Metric("latency_ms_p50", "ms", "lower", True),
    Metric("latency_ms_p95", "ms", "lower", True),
    Metric("latency_cv", "ratio", "lower", True),
    Metric("peak_rss_mb", "MB", "lower", True),
    Metric("perplexity", "-", "lower", False),
    Metric("kld_mean", "nats", "lower", False),
    Metric("kld_p99", "nats", "lower", False),
    Metric("top1_agreement", "ratio", "higher", False),
    Metric("accuracy_retention", "ratio", "higher", False),
    Metric("speedup", "x", "higher", True),
    Metric("speedup_vs_base", "x", "higher", True),
    Metric("accuracy_retention_lo", "ratio", "higher", False),
    Metric("accuracy_retention_hi", "ratio", "higher", False),
    Metric("kld_mean_lo", "nats", "lower", False),
    Metric("kld_mean_hi", "nats", "lower", False),
    Metric("bytes_logged", "bytes", "lower", False, per_artifact=False),
    Metric("memory_reduction", "ratio", "higher", True),
)

METRICS: tuple[str, ...] = tuple(m.name for m in CATALOGUE)
"""The metric names of CONVENTIONS.md, in its order."""

ARTIFACT_METRICS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if m.per_artifact)
"""What the harness measures for every artifact."""

ACCURACY_SIZE_METRICS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if not m.hardware and m.per_artifact)
"""What is measured without the target's hardware: the artifact's bytes and its outputs (any device computes them)."""

BY_NAME: dict[str, Metric] = {m.name: m for m in CATALOGUE}

BOUNDS: dict[str, tuple[str, str]] = {
    "accuracy_retention": ("accuracy_retention_lo", "accuracy_retention_hi"),
    "kld_mean": ("kld_mean_lo", "kld_mean_hi"),
}
"""Metrics measured with an interval over the evaluation windows: name → (lower bound, upper bound)."""


def bound_of(metric: str, side: str) -> str:
    """The name of ``metric``'s ``"pessimistic"`` or ``"optimistic"`` bound (its lower bound is pessimistic when
    higher is better), or ``metric`` itself when it has no interval (or already is a bound)."""
    if metric not in BOUNDS:
        return metric
    lower, upper = BOUNDS[metric]
    higher_better = BY_NAME[metric].better == "higher"
    return lower if (side == "pessimistic") == higher_better else upper
