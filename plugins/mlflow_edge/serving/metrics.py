"""The server's Prometheus metrics (prometheus-client, one registry per server), under the conventions' names, and
the figures ``mlflow-edge monitor`` derives from two scrapes of them.

Exported: ``mlflow_edge_requests_total{route,status}``, ``mlflow_edge_request_seconds{route}`` (end to end, streams
included), ``mlflow_edge_ttft_seconds``, ``mlflow_edge_generated_tokens_total``, ``mlflow_edge_prompt_tokens_total``,
``mlflow_edge_decode_seconds_total`` (first token to last), ``mlflow_edge_inflight_requests``,
``mlflow_edge_queued_requests``, ``mlflow_edge_model_reloads_total{outcome}`` and
``mlflow_edge_model_info{name,alias,version,backend,precision,format}``.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.parser import text_string_to_metric_families

from mlflow_edge.flavors._common import Completion

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
                   120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


class ServerMetrics:
    """The metrics one server exports, and how a finished generation updates them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlflow_edge_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram("mlflow_edge_request_seconds", "End-to-end request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("mlflow_edge_ttft_seconds", "Time from request to first generated token",
                                      buckets=TTFT_BUCKETS, registry=r)
        self.generated_tokens = Counter("mlflow_edge_generated_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("mlflow_edge_prompt_tokens", "Prompt tokens", registry=r)
        self.decode_seconds = Counter("mlflow_edge_decode_seconds", "Time from first to last generated token",
                                      registry=r)
        self.inflight = Gauge("mlflow_edge_inflight_requests", "Generation requests being answered", registry=r)
        self.queued = Gauge("mlflow_edge_queued_requests", "Generations queued or running on the model", registry=r)
        self.reloads = Counter("mlflow_edge_model_reloads", "Alias checks that switched or failed to load a version",
                               ["outcome"], registry=r)
        self.model_info = Info("mlflow_edge_model", "The served model", registry=r)

    def describe_model(self, name: str, alias: str | None, version: str | None, info: Mapping[str, str]) -> None:
        self.model_info.info({"name": name, "alias": alias or "", "version": version or "",
                              "backend": info.get("backend", ""), "precision": info.get("precision", ""),
                              "format": info.get("format", "")})

    def observe_generation(self, completion: Completion, request_started: float) -> None:
        """Token counts, TTFT (from ``request_started``, a ``perf_counter()``) and decode time of one generation."""
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.generated_tokens.inc(completion.completion_tokens)
        if completion.first_token_at is not None:
            self.ttft_seconds.observe(max(0.0, completion.first_token_at - request_started))
            self.decode_seconds.inc(max(0.0, completion.ended - completion.first_token_at))


# -- reading scrapes back -------------------------------------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_scrape(text: str) -> Samples:
    """Every sample of a Prometheus text scrape, keyed by name and sorted labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def model_labels(samples: Samples) -> dict[str, str]:
    """The labels of ``mlflow_edge_model_info`` (name, alias, version, backend, precision)."""
    for (name, labels), _ in samples.items():
        if name == "mlflow_edge_model_info":
            return dict(labels)
    return {}


def _total(samples: Samples, name: str, keep=lambda labels: True) -> float:
    return sum(value for (sample, labels), value in samples.items() if sample == name and keep(dict(labels)))


def _buckets(samples: Samples, name: str, routes: Iterable[str] | None = None) -> list[tuple[float, float]]:
    """Cumulative ``(upper bound, count)`` of a histogram, summed over its ``route`` label when ``routes`` is given."""
    counts: dict[float, float] = {}
    for (sample, labels), value in samples.items():
        label = dict(labels)
        if sample != f"{name}_bucket" or (routes is not None and label.get("route") not in routes):
            continue
        bound = math.inf if label["le"] in ("+Inf", "inf") else float(label["le"])
        counts[bound] = counts.get(bound, 0.0) + value
    return sorted(counts.items())


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated inside its bucket (as PromQL's histogram_quantile)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def _delta(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    old = dict(before)
    return [(bound, count - old.get(bound, 0.0)) for bound, count in after]


def window_figures(before: Samples, after: Samples) -> dict[str, float]:
    """What the server did between two scrapes, under the conventions' ``served.*`` names (a figure without data in
    the window is left out): latency p50/p95 and TTFT p50 in ms, decode tokens/s, error rate (5xx and 429 over the
    generation requests), and the request count."""
    def is_generation(labels: Mapping[str, str]) -> bool:
        return labels.get("route") in GENERATION_ROUTES

    def is_error(labels: Mapping[str, str]) -> bool:
        return is_generation(labels) and (labels.get("status", "").startswith("5") or labels.get("status") == "429")

    requests = _total(after, "mlflow_edge_requests_total", is_generation) - _total(
        before, "mlflow_edge_requests_total", is_generation)
    figures: dict[str, float] = {"served.requests": requests}
    if requests > 0:
        errors = _total(after, "mlflow_edge_requests_total", is_error) - _total(
            before, "mlflow_edge_requests_total", is_error)
        figures["served.error_rate"] = errors / requests
    latency = _delta(_buckets(after, "mlflow_edge_request_seconds", GENERATION_ROUTES),
                     _buckets(before, "mlflow_edge_request_seconds", GENERATION_ROUTES))
    ttft = _delta(_buckets(after, "mlflow_edge_ttft_seconds"), _buckets(before, "mlflow_edge_ttft_seconds"))
    for key, buckets, q in (("served.latency_ms_p50", latency, 0.5), ("served.latency_ms_p95", latency, 0.95),
                            ("served.ttft_ms_p50", ttft, 0.5)):
        if (value := quantile(buckets, q)) is not None:
            figures[key] = value * 1000.0
    decode_s = _total(after, "mlflow_edge_decode_seconds_total") - _total(before, "mlflow_edge_decode_seconds_total")
    first_tokens = _total(after, "mlflow_edge_ttft_seconds_count") - _total(before, "mlflow_edge_ttft_seconds_count")
    tokens = _total(after, "mlflow_edge_generated_tokens_total") - _total(before, "mlflow_edge_generated_tokens_total")
    if decode_s > 0:  # the first token of each generation is TTFT's, not decode's
        figures["served.decode_tok_s"] = max(0.0, tokens - first_tokens) / decode_s
    return figures
