"""Promotion: the best feasible candidate of a target becomes ``<target>-champion`` in the model registry.

A candidate is a finished run tagged ``mlflow_edge.role=candidate`` for the target, with a logged model. Gates are
checked again from the run's metrics (tags are never trusted), the policy ranks the feasible ones, and the winner is
registered and aliased only if it beats the current champion. Registration and alias move together: if the alias
cannot be set, the new version is deleted, so a failure leaves the registry as it was.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from mlflow_edge.backends.base import EdgeError
from mlflow_edge.gates import METRICS, GateReport, Gates

MODEL_URI_TAG = "mlflow_edge.model_uri"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Rank by one metric: ``max:decode_tok_s``, ``min:size_mb``, …"""

    direction: str
    metric: str

    def key(self, metrics: dict[str, float]) -> float:
        """Larger is better; a missing or NaN metric ranks last."""
        value = metrics.get(self.metric)
        if value is None or math.isnan(value):
            return -math.inf
        return value if self.direction == "max" else -value

    def __str__(self) -> str:
        return f"{self.direction}:{self.metric}"


def parse_policy(spec: str) -> Policy:
    direction, _, metric = spec.partition(":")
    if direction not in ("max", "min") or metric not in METRICS:
        raise EdgeError(f"bad promotion policy '{spec}': use max:<metric> or min:<metric> with a conventions metric")
    return Policy(direction, metric)


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
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    runs = candidate_runs(experiment_ids, target, study)
    if not runs:
        raise EdgeError(f"no finished candidate runs for target '{target}'; nothing registered")
    checked: list[tuple[Run, GateReport]] = [(run, gates.check(run.data.metrics)) for run in runs]
    feasible = [(run, report) for run, report in checked if report.passed]
    if not feasible:
        raise EdgeError(f"none of {len(runs)} candidates passed the gates {gates}; nothing registered, champion unchanged")
    best, report = max(feasible, key=lambda item: (policy.key(item[0].data.metrics),
                                                   -item[0].data.metrics.get("size_mb", math.inf)))
    client = MlflowClient()
    alias = champion_alias(target)
    champion = _current_champion(client, registered_model, alias)
    if champion is not None:
        version, champion_metrics = champion
        if policy.key(champion_metrics) >= policy.key(best.data.metrics):
            return Promotion(registered_model, alias, best.info.run_id, version, True, str(policy))
    tags = {
        "mlflow_edge.target": target,
        "mlflow_edge.study": best.data.tags.get("mlflow_edge.study", ""),
        "mlflow_edge.run_id": best.info.run_id,
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
