"""Promotion: the best feasible candidate of a target becomes ``<target>-champion`` in the model registry.

A candidate is a finished run tagged ``mlflow_edge.role=candidate`` for the target, with a logged model. Gates are
checked again from the run's metrics (tags are never trusted), the policy ranks the feasible ones, and the winner is
registered and aliased only if it beats the current champion. Registration and alias move together: if the alias
cannot be set, the new version is deleted, so a failure leaves the registry as it was.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from mlflow_edge.errors import EdgeError
from mlflow_edge.gates import GateReport, Gates
from mlflow_edge.metrics import METRICS

MODEL_URI_TAG = "mlflow_edge.model_uri"


@dataclasses.dataclass(frozen=True)
class Term:
    """One metric a policy ranks by, its direction (``max``/``min``) and weight."""

    direction: str
    metric: str
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.direction}:{self.metric}"


@dataclasses.dataclass(frozen=True)
class Policy:
    """How feasible candidates rank: ``max:decode_tok_s``, ``min:size_mb``, … or a weighted sum
    ``weighted:max:decode_tok_s=0.3,min:size_mb=0.3,max:accuracy_retention=0.4``.

    A weighted policy scales each metric to [0, 1] over the candidates being compared (min–max, best = 1), so metrics
    of different units add up; a candidate missing a ranked metric ranks last::

        >>> policy = parse_policy("weighted:min:size_mb=1,max:accuracy_retention=1")
        >>> policy.scores([{"size_mb": 90, "accuracy_retention": 0.9}, {"size_mb": 100, "accuracy_retention": 1.0}])
        [1.0, 1.0]
    """

    terms: tuple[Term, ...]
    weighted: bool = False

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(t.metric for t in self.terms)

    def scores(self, pool: Sequence[Mapping[str, float]]) -> list[float]:
        """One score per metrics mapping of ``pool``: larger is better."""
        signed = [[_signed(m, t) for t in self.terms] for m in pool]
        if not self.weighted:
            return [row[0] for row in signed]
        columns = list(zip(*signed)) if signed else []
        ranges = []
        for column in columns:
            finite = [v for v in column if math.isfinite(v)]
            ranges.append((min(finite), max(finite)) if finite else (0.0, 0.0))
        scores = []
        for row in signed:
            if not all(math.isfinite(v) for v in row):
                scores.append(-math.inf)
                continue
            scores.append(sum(t.weight * ((v - lo) / (hi - lo) if hi > lo else 1.0)
                              for t, v, (lo, hi) in zip(self.terms, row, ranges)))
        return scores

    def __str__(self) -> str:
        if not self.weighted:
            return str(self.terms[0])
        return "weighted:" + ",".join(f"{t}={t.weight:g}" for t in self.terms)


def _signed(metrics: Mapping[str, float], term: Term) -> float:
    value = metrics.get(term.metric)
    if value is None or math.isnan(value):
        return -math.inf
    return value if term.direction == "max" else -value


def _term(text: str, spec: str, weighted: bool) -> Term:
    body, _, weight_text = text.strip().partition("=") if weighted else (text.strip(), "", "")
    direction, _, metric = body.partition(":")
    if direction not in ("max", "min") or metric not in METRICS:
        raise EdgeError(f"bad promotion policy '{spec}': use max:<metric> or min:<metric> with a conventions metric, "
                        "or weighted:max:<metric>=<weight>,min:<metric>=<weight>,…")
    try:
        weight = float(weight_text) if weighted else 1.0
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise EdgeError(f"bad promotion policy '{spec}': the weight of {body} must be a positive number")
    return Term(direction, metric, weight)


def parse_policy(spec: "str | Policy") -> Policy:
    if isinstance(spec, Policy):
        return spec
    spec = str(spec).strip()
    if spec.startswith("weighted:"):
        parts = [p for p in spec[len("weighted:"):].split(",")]
        terms = tuple(_term(part, spec, weighted=True) for part in parts)
        if len({t.metric for t in terms}) != len(terms):
            raise EdgeError(f"bad promotion policy '{spec}': a metric appears twice")
        return Policy(terms, weighted=True)
    return Policy((_term(spec, spec, weighted=False),))


def champion_alias(target: str) -> str:
    return f"{target}-champion"


@dataclasses.dataclass(frozen=True)
class Promotion:
    registered_model: str
    alias: str
    run_id: str
    version: str | None
    kept_champion: bool
    policy: str

    def describe(self) -> str:
        if self.kept_champion:
            return (f"kept {self.registered_model}@{self.alias} (version {self.version}): the best new candidate "
                    f"(run {self.run_id}) is not better by {self.policy}")
        return f"promoted run {self.run_id} to {self.registered_model} version {self.version} @{self.alias}"


def candidate_runs(experiment_ids: Sequence[str], target: str, study: str | None = None) -> list[Run]:
    clauses = ["tags.`mlflow_edge.role` = 'candidate'", f"tags.`mlflow_edge.target` = '{target}'",
               "attributes.status = 'FINISHED'"]
    if study:
        clauses.append(f"tags.`mlflow_edge.study` = '{study}'")
    runs = mlflow.search_runs(experiment_ids=list(experiment_ids), filter_string=" AND ".join(clauses),
                              output_format="list")
    return [run for run in runs if MODEL_URI_TAG in run.data.tags]


def promote(experiment_ids: Sequence[str], target: str, gates: Gates, policy: str | Policy,
            registered_model: str, study: str | None = None) -> Promotion:
    """Register the best gate-passing candidate and point ``<target>-champion`` at it (or keep a better champion)."""
    policy = parse_policy(policy)
    runs = candidate_runs(experiment_ids, target, study)
    if not runs:
        raise EdgeError(f"no finished candidate runs for target '{target}'; nothing registered")
    checked: list[tuple[Run, GateReport]] = [(run, gates.check(run.data.metrics)) for run in runs]
    feasible = [(run, report) for run, report in checked if report.passed]
    if not feasible:
        raise EdgeError(f"none of {len(runs)} candidates passed the gates {gates}; nothing registered, "
                        "champion unchanged")
    client = MlflowClient()
    alias = champion_alias(target)
    champion = _current_champion(client, registered_model, alias)
    pool = [run.data.metrics for run, _ in feasible] + ([champion[1]] if champion else [])
    scores = policy.scores(pool)
    ranked = sorted(range(len(feasible)), key=lambda i: (scores[i], -feasible[i][0].data.metrics.get("size_mb",
                                                                                                      math.inf)))
    best, report = feasible[ranked[-1]]
    if champion is not None and scores[-1] >= scores[ranked[-1]]:
        return Promotion(registered_model, alias, best.info.run_id, champion[0], True, str(policy))
    tags = {
        "mlflow_edge.target": target,
        "mlflow_edge.study": best.data.tags.get("mlflow_edge.study", ""),
        "mlflow_edge.run_id": best.info.run_id,
        **{key: best.data.tags[key] for key in ("mlflow_edge.trial", "optuna.study") if key in best.data.tags},
        "precision": best.data.params.get("precision", ""),
        "backend": best.data.params.get("backend", ""),
        "source.sha256": best.data.params.get("source.sha256", ""),
        "policy": str(policy),
        **report.as_tags(),
    }
    version = mlflow.register_model(best.data.tags[MODEL_URI_TAG], registered_model, tags=tags)
    try:
        client.set_registered_model_alias(registered_model, alias, version.version)
    except Exception:
        client.delete_model_version(registered_model, version.version)
        raise
    return Promotion(registered_model, alias, best.info.run_id, str(version.version), False, str(policy))


def _current_champion(client: MlflowClient, name: str, alias: str) -> tuple[str, dict[str, float]] | None:
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    run_id = version.tags.get("mlflow_edge.run_id") or version.run_id
    metrics = client.get_run(run_id).data.metrics if run_id else {}
    return str(version.version), metrics
