"""``mlflow-edge monitor``: what a running server does, logged back into MLflow.

Every ``interval`` seconds the monitor scrapes ``/metrics`` and logs the window's figures (``served.latency_ms_p50``,
``served.latency_ms_p95``, ``served.ttft_ms_p50``, ``served.decode_tok_s``, ``served.error_rate``) as metrics of one
run tagged ``mlflow_edge.role=monitor`` with the served model's name, alias and version, and on the registered
version's logged model. Each window is checked against the gates the version was promoted under (its
``mlflow_edge.gates`` tag) where the server measures the gate's metric — latency, TTFT, decode speed, and ``speedup``
as the served decode speed over the reference's (the candidate run's ``decode_tok_s`` / ``speedup``) — and against
``max_error_rate``; a breach tags the version ``mlflow_edge.monitor.breach`` and prints one line.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_edge.errors import EdgeError, first_line
from mlflow_edge.gates import parse_gates
from mlflow_edge.runs import DEFAULT_EXPERIMENT, tracked_run
from mlflow_edge.serving.metrics import Samples, model_labels, parse_scrape, window_figures
from mlflow_edge.tags import GATES_TAG, ROLE_TAG

BREACH_TAG = "mlflow_edge.monitor.breach"
SERVED_AS = {"served.latency_ms_p50": "latency_ms_p50", "served.latency_ms_p95": "latency_ms_p95",
             "served.ttft_ms_p50": "ttft_ms", "served.decode_tok_s": "decode_tok_s"}
"""The served figures a promotion gate on the same conventions metric is checked against."""


def scrape(url: str, timeout_s: float = 10.0) -> Samples:
    """The samples of ``<url>/metrics``; an unreachable server is an :class:`EdgeError`."""
    target = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as response:
            return parse_scrape(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EdgeError(f"cannot scrape {target}: {first_line(exc)}") from exc


class Monitor:
    """The served model version, the gates it was promoted under, and the checks of each window against them."""

    def __init__(self, labels: Mapping[str, str], max_error_rate: float) -> None:
        self.labels = dict(labels)
        self.max_error_rate = max_error_rate
        self.version = self._registered_version()
        tags = self.version.tags if self.version is not None else {}
        self.gates = parse_gates(tags[GATES_TAG]) if tags.get(GATES_TAG) else None
        self.run_metrics = self._promoted_metrics()

    def _registered_version(self) -> Any:
        name, version = self.labels.get("name"), self.labels.get("version")
        if not name or not version:
            return None
        try:
            return MlflowClient().get_model_version(name, version)
        except MlflowException:
            return None

    def _promoted_metrics(self) -> dict[str, float]:
        """The metrics the version was promoted on (its candidate run's)."""
        run_id = self.version.run_id if self.version is not None else None
        return dict(MlflowClient().get_run(run_id).data.metrics) if run_id else {}

    def gate_metrics(self, figures: Mapping[str, float]) -> dict[str, float]:
        """The promoted metrics with this window's served figures in place of the measured ones (``speedup``: the
        served decode speed over the reference's, i.e. the run's ``decode_tok_s`` / ``speedup``)."""
        served = {SERVED_AS[key]: value for key, value in figures.items() if key in SERVED_AS}
        promoted = self.run_metrics
        if "decode_tok_s" in served and promoted.get("decode_tok_s") and promoted.get("speedup"):
            served["speedup"] = served["decode_tok_s"] * promoted["speedup"] / promoted["decode_tok_s"]
        return {**promoted, **served}

    def breaches(self, figures: Mapping[str, float]) -> list[str]:
        """What in this window breaches the gates the version was promoted under, one phrase each: a gate group
        that fails with the served figures in and names one of them."""
        found = []
        if figures.get("served.error_rate", 0.0) > self.max_error_rate:
            found.append(f"error rate {figures['served.error_rate']:.3f} > {self.max_error_rate:g}")
        if self.gates is not None and figures.get("served.requests", 0) > 0:
            metrics = self.gate_metrics(figures)
            served = set(SERVED_AS.values()) | {"speedup"}
            for group in self.gates.check(metrics).groups:
                if group.status == "fail" and any(r.gate.metric in served for r in group.results):
                    found.append(f"{group.group} (served {_values(group)})")
        return found

    def record_breach(self, breaches: list[str]) -> None:
        message = "; ".join(breaches)
        if self.version is not None:
            MlflowClient().set_model_version_tag(self.version.name, self.version.version, BREACH_TAG, message[:5000])
        print(f"mlflow-edge: monitor: {self.labels.get('name')} version {self.labels.get('version')} breaches its "
              f"gates: {message}", flush=True)


def _values(group: Any) -> str:
    return ", ".join(f"{r.gate.metric}={r.value:.4g}" for r in group.results if r.value is not None)


def monitor(url: str, interval_s: float = 30.0, windows: int = 0, max_error_rate: float = 0.01,
            experiment: str | None = None, sleep: Callable[[float], None] = time.sleep) -> str:
    """Scrape the server at ``url`` every ``interval_s`` seconds for ``windows`` windows (0: until interrupted) and
    log each window's figures; returns the monitor run's id."""
    before = scrape(url)
    labels = model_labels(before)
    if not labels:
        raise EdgeError(f"{url} is not an mlflow-edge server (no mlflow_edge_model_info in its /metrics)")
    watch = Monitor(labels, max_error_rate)
    tags = {ROLE_TAG: "monitor", "mlflow_edge.served_url": url,
            **{f"mlflow_edge.served.{key}": value for key, value in labels.items()}}
    model_id = getattr(watch.version, "model_id", None)
    with tracked_run(f"monitor-{labels.get('name')}-v{labels.get('version')}", experiment or DEFAULT_EXPERIMENT,
                     tags=tags) as run:
        step = 0
        try:
            while windows <= 0 or step < windows:
                sleep(interval_s)
                after = scrape(url)
                _log_window(watch, window_figures(before, after), step, model_id)
                before, step = after, step + 1
        except KeyboardInterrupt:
            pass
    return run.info.run_id


def _log_window(watch: Monitor, figures: dict[str, float], step: int, model_id: str | None) -> None:
    mlflow.log_metrics(figures, step=step)
    if model_id:
        mlflow.log_metrics(figures, step=step, model_id=model_id)
    if breaches := watch.breaches(figures):
        watch.record_breach(breaches)
    shown = ", ".join(f"{key.removeprefix('served.')} {value:.4g}" for key, value in figures.items())
    print(f"mlflow-edge: monitor: window {step}: {shown}", flush=True)
