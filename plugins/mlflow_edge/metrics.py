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
    Metric("memory_reduction", "ratio", "higher", True),
)

METRICS: tuple[str, ...] = tuple(m.name for m in CATALOGUE)
"""The metric names of CONVENTIONS.md, in its order."""

ACCURACY_SIZE_METRICS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if not m.hardware)
"""What is measured without the target's hardware: the artifact's bytes and its outputs (any device computes them)."""

BY_NAME: dict[str, Metric] = {m.name: m for m in CATALOGUE}
