"""The flows behind the CLI and the MLproject entry points: convert, quantize, evaluate and sweep.

Every flow runs inside an MLflow run (the one ``mlflow run`` started, or a new one). A failure ends that run FAILED
with the one-line reason in the ``mlflow_edge.error`` tag and registers nothing. Conversions and quantizations go
through the content-addressed cache (:mod:`mlflow_edge.artifacts`), so a rerun reuses them. Where no backend is
named, a flow takes the first installed backend the target recommends.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow

from mlflow_edge import flavors
from mlflow_edge.artifacts import convert, export_copy, quantize
from mlflow_edge.backends import get_backend, open_local_artifact
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import calibration_text, check_disjoint
from mlflow_edge.evaluation.harness import REFERENCE, EvalSettings, Evaluator
from mlflow_edge.gates import parse_gates
from mlflow_edge.plan import planned
from mlflow_edge.runs import (
    artifact_params,
    evaluate_candidate,
    evaluate_reference,
    log_model_with_metrics,
    log_new_params,
    progress,
    run_tags,
    tracked_run,
)
from mlflow_edge.sources import SourceModel, resolve_source
from mlflow_edge.targets import get_target


def default_backend(target: str) -> str:
    """The first installed backend that ``target`` recommends (primary before secondary)."""
    from mlflow_edge.search.space import backends_for

    installed = backends_for(target)
    if not installed:
        raise EdgeError(f"no installed backend serves target '{target}'")
    return installed[0]


def ensure_writable(folder: str | Path | None) -> Path | None:
    """Refuse an output folder that cannot be written, before any work is done."""
    if folder is None:
        return None
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise EdgeError(f"output folder is not writable: {path} ({exc.strerror})") from None
    return path


# -- flows -------------------------------------------------------------------------------------------------------
def run_convert(model: str, backend: str | None = None, precision: str | None = None, target: str = "cpu",
                output_dir: str | None = None, experiment: str | None = None) -> str:
    get_target(target)
    backend = backend or default_backend(target)
    precision = precision or get_backend(backend).base_precision
    out = ensure_writable(output_dir)
    with tracked_run(f"convert-{precision}", experiment, tags=run_tags(target, "convert", "artifact", [backend])):
        source = resolve_source(model)
        progress(f"converting {source.name} to {backend} {precision}")
        artifact = convert(source, backend, precision)
        export_copy(artifact, out)
        log_new_params(artifact_params(artifact, target))
        mlflow.log_metric("size_mb", artifact.size_bytes / 1e6)
        return log_model_with_metrics(artifact)


def run_quantize(model: str, precision: str, backend: str | None = None, base_precision: str | None = None,
                 options: Mapping[str, Any] | None = None, target: str = "cpu", output_dir: str | None = None,
                 calibration_path: str | None = None, experiment: str | None = None) -> str:
    get_target(target)
    backend = backend or default_backend(target)
    out = ensure_writable(output_dir)
    with tracked_run(f"quantize-{precision}", experiment, tags=run_tags(target, "quantize", "artifact", [backend])):
        source = resolve_source(model)
        calibration = calibration_text(calibration_path)
        base = convert(source, backend, base_precision)
        progress(f"quantizing {source.name} to {precision}")
        artifact = quantize(source, base, precision, options, calibration)
        export_copy(artifact, out)
        log_new_params(artifact_params(artifact, target))
        mlflow.log_metric("size_mb", artifact.size_bytes / 1e6)
        return log_model_with_metrics(artifact)


def run_evaluate(model: str, artifact_uri: str, target: str = "cpu", gates: str | Sequence[str] | None = None,
                 settings: EvalSettings | None = None, experiment: str | None = None) -> dict[str, float]:
    """Evaluate a logged model (``models:/…``, ``runs:/…``) or a local model file or folder against ``model``."""
    get_target(target)
    gate_spec = parse_gates(gates)
    settings = settings or EvalSettings()
    with tracked_run("evaluate", experiment, tags=run_tags(target, "evaluate", "candidate")) as run:
        source = resolve_source(model)
        artifact = _artifact_from_uri(artifact_uri, source)
        evaluator = Evaluator(source, settings)
        try:
            evaluate_reference(evaluator, target, run.info.run_id)
            result = evaluate_candidate(evaluator, artifact, gate_spec, target, run.info.run_id,
                                        base=_unquantized_base(source, artifact, settings))
        finally:
            evaluator.close()
        return result["metrics"]


def _unquantized_base(source: SourceModel, artifact: Artifact, settings: EvalSettings) -> Artifact | None:
    """The artifact's backend's unquantized conversion of ``source`` (cached), for ``speedup_vs_base``; ``None``
    when speed is not measured or the backend cannot convert it (said in one line)."""
    if not settings.speed:
        return None
    try:
        return convert(source, artifact.backend)
    except EdgeError as exc:
        progress(f"speedup_vs_base not measured: {exc}")
        return None


def _artifact_from_uri(uri: str, source: SourceModel) -> Artifact:
    if "://" in uri or uri.startswith(("models:", "runs:")):
        return flavors.artifact_from_model(uri)
    return open_local_artifact(Path(uri), source)


def run_sweep(model: str = "demo", backend: str | None = None, types: Sequence[str] | None = None,
              base_precision: str | None = None, options: Mapping[str, Any] | None = None, target: str = "cpu",
              gates: str | Sequence[str] | None = None, policy: str = "min:size_mb",
              registered_model: str | None = None, settings: EvalSettings | None = None,
              calibration_path: str | None = None, experiment: str | None = None):
    """convert → a fixed sweep of one backend's quantization types (default: its ``sweep_types``) → evaluate each
    against the reference → promote. The exhaustive counterpart of the search (``main``), for a grid chosen by hand."""
    from mlflow_edge import registry

    get_target(target)
    backend = backend or default_backend(target)
    types = tuple(types or get_backend(backend).sweep_types)
    gate_spec = parse_gates(gates)
    registry.parse_policy(policy)
    settings = settings or EvalSettings()
    calibration = calibration_text(calibration_path)
    check_disjoint(settings.text, calibration)
    with tracked_run("sweep", experiment, tags=run_tags(target, "sweep", "study", [backend])) as parent:
        study = parent.info.run_id
        mlflow.set_tag("mlflow_edge.study", study)
        source = resolve_source(model)
        plan = planned(source, [backend], settings.window, settings.reference_dtype, chosen=True)
        for note in plan.notes:
            progress(note)
        settings = dataclasses.replace(settings, reference_dtype=plan.reference_dtype)
        log_new_params({"model": model, "source": source.name, "source.sha256": source.sha256, "backend": backend,
                        "target": target, "types": ",".join(types), "gates": str(gate_spec), "policy": policy,
                        **settings.params(), **plan.params})
        progress(f"source {source.name}: {source.num_parameters / 1e6:.1f} M parameters")
        base = convert(source, backend, base_precision)
        progress(f"converted to {backend} {base.precision} ({base.size_bytes / 1e6:.1f} MB)")
        evaluator = Evaluator(source, settings)
        try:
            reference = evaluate_reference(evaluator, target, study)
            rows = [{"name": "reference", "backend": "transformers", "precision": plan.reference_dtype,
                     "role": REFERENCE, **reference}]
            rows += _sweep_rows(evaluator, source, base, types, options, calibration, gate_spec, target, study)
        finally:
            evaluator.close()
        _log_sweep_report(rows, f"{source.name} on {target}: {backend} sweep")
        return registry.promote_study(parent, study, source.name, target, gate_spec, policy, registered_model)


def _sweep_rows(evaluator: Evaluator, source: SourceModel, base: Artifact, types: Sequence[str],
                options: Mapping[str, Any] | None, calibration: Any, gate_spec: Any, target: str,
                study: str) -> list[dict[str, Any]]:
    """One nested run per type; a type the backend refuses is reported and skipped."""
    rows = []
    for i, qtype in enumerate(types, 1):
        progress(f"[{i}/{len(types)}] {qtype}")
        try:
            with tracked_run(qtype, nested=True, tags=run_tags(target, study, "candidate", [base.backend])):
                artifact = quantize(source, base, qtype, options, calibration)
                result = evaluate_candidate(evaluator, artifact, gate_spec, target, study, base=base)
        except EdgeError as exc:
            progress(f"{qtype} failed: {exc}")
            continue
        rows.append({"name": qtype, "backend": base.backend, "precision": artifact.precision, "role": "candidate",
                     "gates": result["report"], **result["metrics"]})
    return rows


def _log_sweep_report(rows: Sequence[Mapping[str, Any]], title: str) -> None:
    from mlflow_edge.report import comparison_table, write_report

    table = comparison_table(rows)
    with tempfile.TemporaryDirectory() as tmp:
        write_report(table, Path(tmp), title=title)
        mlflow.log_artifacts(tmp, artifact_path="report")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
