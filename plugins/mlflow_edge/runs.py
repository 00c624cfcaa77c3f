"""MLflow run helpers shared by the flows and the search: runs that end FAILED with a one-line reason, the conventions'
tags and params, and the logging of a measured artifact. Knows no search library and no framework.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import mlflow

from mlflow_edge import flavors, procs
from mlflow_edge.backends import get_backend
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError
from mlflow_edge.tags import (
    ACCURACY_FROM_TAG,
    ACCURACY_KEY_TAG,
    DIGEST_TAG,
    ERROR_TAG,
    MODEL_URI_TAG,
    OWNER_TAG,
    PRUNED_TAG,
    REFERENCE_REUSED_TAG,
    ROLE_TAG,
    STUDY_TAG,
    TARGET_TAG,
)
from mlflow_edge.targets import framework_versions, hardware_fingerprint

if TYPE_CHECKING:
    from mlflow_edge.evaluation.harness import Evaluator
    from mlflow_edge.gates import Gates

DEFAULT_EXPERIMENT = "mlflow-edge"
STALE_REASON = "interrupted: the run was left RUNNING by a process that stopped"


def progress(message: str) -> None:
    print(f"[mlflow-edge {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- runs --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tracked_run(run_name: str, experiment: str | None = None, nested: bool = False,
                tags: Mapping[str, str] | None = None,
                stopped_early: tuple[type[BaseException], ...] = ()) -> Iterator[mlflow.ActiveRun]:
    """A run that ends FAILED with the reason tagged when the body raises; resumes the run ``mlflow run`` made.

    An exception of a class in ``stopped_early`` (a search pruning a candidate on purpose) ends it KILLED instead,
    tagged ``mlflow_edge.pruned`` with the reason. The run is tagged with its owner process (:data:`OWNER_TAG`), so a
    later search can tell a run whose process died. However the body fails (runs it left open, a store that refuses
    the tag), this run is ended and the active run is again the one before it.
    """
    if not nested and mlflow.active_run() is None and "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(experiment or DEFAULT_EXPERIMENT)
    run = mlflow.start_run(run_name=None if (not nested and "MLFLOW_RUN_ID" in os.environ) else run_name,
                           nested=nested, tags={**dict(tags or {}), OWNER_TAG: procs.owner_tag()})
    if not nested:
        end_runs_of_gone_processes(run.info.experiment_id)
    try:
        yield run
    except stopped_early as exc:
        _end(run.info.run_id, "KILLED", PRUNED_TAG, str(exc)[:5000] or "pruned")
        raise
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
        _end(run.info.run_id, "FAILED", ERROR_TAG, reason.splitlines()[0][:5000] if reason else type(exc).__name__)
        raise
    else:
        _end(run.info.run_id, "FINISHED")


def _end(run_id: str, status: str, tag: str | None = None, reason: str = "") -> None:
    """End ``run_id`` with ``status`` (tagging ``reason`` first, as far as the store lets), and every run the body
    left open above it (FAILED, or KILLED when pruned)."""
    if tag:
        try:
            mlflow.MlflowClient().set_tag(run_id, tag, reason)
        except Exception:  # the run still ends with its status, and the body's own error is what propagates
            pass
    while (active := mlflow.active_run()) is not None:
        above = active.info.run_id != run_id
        mlflow.end_run("FAILED" if above and status == "FINISHED" else status)
        if not above:
            break


def end_runs_of_gone_processes(experiment_id: str) -> list[str]:
    """End FAILED (tagged :data:`STALE_REASON`) the runs of ``experiment_id`` left RUNNING by a process of this host
    that is gone (killed mid-command); runs of live processes and of other hosts stay. Returns their ids."""
    client = mlflow.MlflowClient()
    ended = []
    try:
        for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            if procs.owner_gone(run.data.tags.get(OWNER_TAG)):
                end_stale_run(run.info.run_id, client)
                ended.append(run.info.run_id)
    except mlflow.exceptions.MlflowException:  # another process ended it first, or the store refused: not ours to fail
        pass
    return ended


def end_stale_run(run_id: str, client: mlflow.MlflowClient | None = None) -> None:
    """End ``run_id`` FAILED with :data:`STALE_REASON`, unless it already ended."""
    client = client or mlflow.MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, ERROR_TAG, STALE_REASON)
        client.set_terminated(run_id, "FAILED")


def filter_literal(value: str) -> str | None:
    """``value`` as a string literal of MLflow's search filter, which strips the enclosing quotes and unescapes
    nothing: single quotes unless ``value`` holds one, else double quotes; ``None`` when neither works."""
    if "\\" in value:
        return None
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    return None


def log_new_params(params: Mapping[str, Any]) -> None:
    """Log ``params`` on the active run, skipping keys already there (``mlflow run`` logs its own parameters)."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def run_tags(target: str, study: str, role: str, backends: Sequence[str] = ()) -> dict[str, str]:
    """The conventions' tags: target, study, role, hardware fingerprint and framework versions."""
    tags = {TARGET_TAG: target, STUDY_TAG: study, ROLE_TAG: role}
    tags.update(hardware_fingerprint())
    tags.update(framework_versions())
    for name in backends:
        tags.update({f"version.{k}": v for k, v in get_backend(name).versions().items()})
    return tags


def artifact_params(artifact: Artifact, target: str) -> dict[str, Any]:
    params: dict[str, Any] = {"backend": artifact.backend, "format": artifact.format, "precision": artifact.precision,
                              "target": target, "source": artifact.source_name, "source.sha256": artifact.source_sha256}
    for key, value in artifact.options.items():
        params[key if key.startswith("calib.") else f"{artifact.backend}.{key}"] = value
    return params


# -- logging ------------------------------------------------------------------------------------------------------
def log_model_with_metrics(artifact: Artifact, metrics: Mapping[str, float] | None = None) -> str:
    """Log ``artifact`` as a model of its flavor in the active run, with ``metrics`` on the run and on the model."""
    info = flavors.log_artifact_model(artifact, name="model")
    if metrics:
        mlflow.log_metrics(dict(metrics))
        mlflow.log_metrics(dict(metrics), model_id=info.model_id)
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def store_model(run_id: str, artifact: Artifact, metrics: Mapping[str, float]) -> int:
    """Give the finished candidate run ``run_id`` its model: the model another run of the experiment logged with the
    same content hash (:data:`DIGEST_TAG`), else ``artifact`` logged into it now (with ``metrics`` on the logged
    model). Returns the bytes logged (0 when the run had a model or shares one)."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    if MODEL_URI_TAG in run.data.tags:
        return 0
    digest = run.data.tags.get(DIGEST_TAG)
    twin = _model_with_digest(run.info.experiment_id, digest) if digest else None
    if twin is not None:
        client.set_tag(run_id, MODEL_URI_TAG, twin)
        return 0
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = flavors.log_artifact_model(artifact, name="model")
        if metrics:
            mlflow.log_metrics(dict(metrics), model_id=info.model_id)
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return artifact.size_bytes


def _model_with_digest(experiment_id: str, digest: str) -> str | None:
    """The model URI of a finished run of ``experiment_id`` whose artifact has content hash ``digest``."""
    found = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`{DIGEST_TAG}` = '{digest}' AND attributes.status = 'FINISHED'", max_results=50)
    return next((r.data.tags[MODEL_URI_TAG] for r in found if MODEL_URI_TAG in r.data.tags), None)


def earlier_accuracy(experiment_id: str, digest: str, accuracy_key: str) -> tuple[str, dict[str, float]] | None:
    """``(run id, accuracy and size metrics)`` of a finished run of ``experiment_id`` that measured the accuracy of an
    artifact with content hash ``digest`` against ``accuracy_key``, on whatever machine; ``None`` if there is none."""
    from mlflow_edge.metrics import ACCURACY_SIZE_METRICS

    found = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`{DIGEST_TAG}` = '{digest}' AND tags.`{ACCURACY_KEY_TAG}` = '{accuracy_key}' "
        "AND attributes.status = 'FINISHED'", max_results=20)
    for run in found:
        metrics = {k: v for k, v in run.data.metrics.items() if k in ACCURACY_SIZE_METRICS}
        if {"perplexity", "kld_mean", "accuracy_retention"} <= metrics.keys():
            return run.data.tags.get(ACCURACY_FROM_TAG, run.info.run_id), metrics
    return None


_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def evaluate_reference(evaluator: "Evaluator", target: str, study: str) -> dict[str, float]:
    """A nested run for the reference (the source model in ``transformers``)."""
    with tracked_run("reference", nested=True, tags=run_tags(target, study, "reference")):
        dtype = evaluator.reference_dtype
        progress(f"measuring the reference ({evaluator.source.name}, transformers {dtype})")
        metrics = evaluator.evaluate_reference()
        if evaluator.reference_reused:
            progress("the reference was measured before on this machine with these settings: taken from the cache")
            mlflow.set_tag(REFERENCE_REUSED_TAG, "true")
        mlflow.log_params({"backend": "transformers", "format": "safetensors",
                           "precision": _PRECISION.get(dtype, dtype), "target": target,
                           "source": evaluator.source.name, "source.sha256": evaluator.source.sha256,
                           "reference.dtype": dtype, "reference.runtime": "transformers",
                           **evaluator.settings.params()})
        mlflow.log_metrics(metrics)
    return metrics


def evaluate_candidate(evaluator: "Evaluator", artifact: Artifact, gates: "Gates", target: str,
                       study: str, base: Artifact | None = None, log_model: bool = True,
                       known_accuracy: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Measure ``artifact`` (``speedup_vs_base`` against ``base`` when given; only speed with ``known_accuracy``),
    check the gates, log params, metrics, tags (the content hash and accuracy key among them) and, unless
    ``log_model`` is false, the model in the active run."""
    from mlflow_edge.artifacts import content_digest

    metrics = evaluator.evaluate(artifact, base, known_accuracy)
    report = gates.check(metrics)
    mlflow.log_params({**artifact_params(artifact, target), **evaluator.settings.params()})
    mlflow.set_tags({**report.as_tags(), DIGEST_TAG: content_digest(artifact),
                     ACCURACY_KEY_TAG: evaluator.accuracy_key()})
    if log_model:
        model_uri = log_model_with_metrics(artifact, metrics)
    else:
        mlflow.log_metrics(dict(metrics))
        model_uri = None
    speed = f", decode {metrics['decode_tok_s']:.1f} tok/s" if "decode_tok_s" in metrics else ""
    progress(f"{artifact.precision}: size {metrics['size_mb']:.1f} MB, ppl {metrics['perplexity']:.3f}, "
             f"KLD {metrics['kld_mean']:.4f}{speed}, gates {report.describe()}")
    return {"metrics": metrics, "report": report, "model_uri": model_uri}
