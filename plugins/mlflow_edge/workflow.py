"""The flows behind the CLI and the MLproject entry points: convert, quantize, evaluate, and the whole ``main``.

Every flow runs inside an MLflow run (the one ``mlflow run`` started, or a new one). A failure ends that run FAILED
with the one-line reason in the ``mlflow_edge.error`` tag and registers nothing. Conversions and quantizations go
through the content-addressed cache, so a rerun reuses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import mlflow
import optuna

from mlflow_edge import cache, flavors
from mlflow_edge.backends import get_backend
from mlflow_edge.backends.base import Artifact, EdgeError
from mlflow_edge.evaluation.data import TextSlice, calibration_text, check_disjoint
from mlflow_edge.evaluation.harness import REFERENCE, EvalSettings, Evaluator
from mlflow_edge.gates import Gates, parse_gates
from mlflow_edge.sources import SourceModel, resolve_source
from mlflow_edge.targets import framework_versions, get_target, hardware_fingerprint

if TYPE_CHECKING:
    from mlflow_edge.registry import Policy

DEFAULT_EXPERIMENT = "mlflow-edge"
DEFAULT_SWEEP = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
ERROR_TAG = "mlflow_edge.error"
PRUNED_TAG = "mlflow_edge.pruned"


def progress(message: str) -> None:
    print(f"[mlflow-edge {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- runs --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tracked_run(run_name: str, experiment: str | None = None, nested: bool = False,
                tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run that ends FAILED with the reason tagged when the body raises (KILLED, tagged ``mlflow_edge.pruned``, when
    a search prunes it); resumes the run ``mlflow run`` made."""
    if not nested and mlflow.active_run() is None and "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(experiment or DEFAULT_EXPERIMENT)
    run = mlflow.start_run(run_name=None if (not nested and "MLFLOW_RUN_ID" in os.environ) else run_name,
                           nested=nested, tags=dict(tags or {}))
    try:
        yield run
    except optuna.TrialPruned as exc:  # a search stopped this candidate early on purpose
        mlflow.set_tag(PRUNED_TAG, str(exc)[:5000] or "pruned")
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
        mlflow.set_tag(ERROR_TAG, reason.splitlines()[0][:5000] if reason else type(exc).__name__)
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def log_new_params(params: Mapping[str, Any]) -> None:
    """Log ``params`` on the active run, skipping keys already there (``mlflow run`` logs its own parameters)."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def run_tags(target: str, study: str, role: str, backends: Sequence[str] = ()) -> dict[str, str]:
    """The conventions' tags: target, study, role, hardware fingerprint and framework versions."""
    tags = {"mlflow_edge.target": target, "mlflow_edge.study": study, "mlflow_edge.role": role}
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


# -- cached conversions -----------------------------------------------------------------------------------------
def _cached_artifact(kind: str, key: Mapping[str, Any], build: Callable[[Path], Artifact]) -> Artifact:
    def build_into(tmp: Path) -> None:
        artifact = build(tmp)
        data = json.loads(artifact.to_json())
        data["path"] = str(Path(data["path"]).relative_to(tmp))
        data["files"] = [str(Path(f).relative_to(tmp)) for f in data["files"]]
        (tmp / "artifact.json").write_text(json.dumps(data, sort_keys=True))

    folder = cache.get_or_build(kind, key, build_into)
    data = json.loads((folder / "artifact.json").read_text())
    data["path"] = str(folder / data["path"])
    data["files"] = [str(folder / f) for f in data["files"]]
    return Artifact.from_json(json.dumps(data))


def convert(source: SourceModel, backend: str, precision: str) -> Artifact:
    """``source`` in ``backend``'s format at ``precision`` (cached by source hash, precision and framework version)."""
    impl = get_backend(backend)
    reason = impl.unsupported_reason(source)
    if reason:
        raise EdgeError(f"unsupported architecture: {reason}")
    key = {"source": source.sha256, "backend": backend, "format": impl.format, "precision": precision.lower(),
           "versions": impl.versions()}
    return _cached_artifact(f"convert-{backend}", key, lambda tmp: impl.convert(source, tmp, precision))


def base_precision(backend: str) -> str:
    """The precision a backend's base conversion is written in: ``f16`` where it offers it."""
    precisions = list(get_backend(backend).convert_precisions())
    return "f16" if "f16" in precisions else precisions[0]


def quantize(source: SourceModel, base: Artifact, precision: str, options: Mapping[str, Any] | None = None,
             calibration: TextSlice | None = None) -> Artifact:
    """``base`` quantized to ``precision`` with ``options`` (cached by all of those and the calibration text)."""
    impl = get_backend(base.backend)
    options = dict(options or {})
    key = {"source": source.sha256, "base": base.precision, "backend": base.backend, "format": impl.format,
           "precision": precision.upper(),
           "options": options, "calibration": calibration.sha256 if calibration else None,
           "versions": impl.versions()}
    return _cached_artifact(
        f"quantize-{base.backend}", key,
        lambda tmp: impl.quantize(base, tmp, precision, options, calibration=calibration, source=source),
    )


def export_copy(artifact: Artifact, output_dir: Path | None) -> None:
    if output_dir is not None:
        for file in artifact.files:
            shutil.copyfile(file, output_dir / f"{artifact.source_name}.{artifact.precision}{file.suffix}")


# -- logging -----------------------------------------------------------------------------------------------------
def log_model_with_metrics(artifact: Artifact, metrics: Mapping[str, float] | None = None) -> str:
    """Log ``artifact`` as a model of its flavor in the active run, with ``metrics`` on the run and on the model."""
    info = flavors.log_artifact_model(artifact, name="model")
    if metrics:
        mlflow.log_metrics(dict(metrics))
        mlflow.log_metrics(dict(metrics), model_id=info.model_id)
    mlflow.set_tag("mlflow_edge.model_uri", info.model_uri)
    return info.model_uri


def evaluate_reference(evaluator: Evaluator, target: str, study: str) -> dict[str, float]:
    """A nested run for the reference (the source model in ``transformers``)."""
    with tracked_run("reference", nested=True, tags=run_tags(target, study, "reference")):
        progress(f"measuring the reference ({evaluator.source.name}, transformers fp32)")
        metrics = evaluator.evaluate_reference()
        mlflow.log_params({"backend": "transformers", "format": "safetensors", "precision": "fp32", "target": target,
                           "source": evaluator.source.name, "source.sha256": evaluator.source.sha256,
                           **evaluator.settings.params()})
        mlflow.log_metrics(metrics)
    return metrics


def evaluate_candidate(evaluator: Evaluator, artifact: Artifact, gates: Gates, target: str, study: str) -> dict[str, Any]:
    """Measure ``artifact``, check the gates, log params, metrics, tags and the model in the active run."""
    metrics = evaluator.evaluate(artifact)
    report = gates.check(metrics)
    mlflow.log_params({**artifact_params(artifact, target), **evaluator.settings.params()})
    mlflow.set_tags(report.as_tags())
    model_uri = log_model_with_metrics(artifact, metrics)
    speed = f", decode {metrics['decode_tok_s']:.1f} tok/s" if "decode_tok_s" in metrics else ""
    progress(f"{artifact.precision}: size {metrics['size_mb']:.1f} MB, ppl {metrics['perplexity']:.3f}, "
             f"KLD {metrics['kld_mean']:.4f}{speed}, gates {report.describe()}")
    return {"metrics": metrics, "report": report, "model_uri": model_uri}


# -- flows -------------------------------------------------------------------------------------------------------
def run_convert(model: str, backend: str = "llamacpp", precision: str = "f16", target: str = "cpu",
                output_dir: str | None = None, experiment: str | None = None) -> str:
    get_target(target)
    out = ensure_writable(output_dir)
    with tracked_run(f"convert-{precision}", experiment, tags=run_tags(target, "convert", "candidate", [backend])):
        source = resolve_source(model)
        progress(f"converting {source.name} to {backend} {precision}")
        artifact = convert(source, backend, precision)
        export_copy(artifact, out)
        log_new_params(artifact_params(artifact, target))
        mlflow.log_metric("size_mb", artifact.size_bytes / 1e6)
        return log_model_with_metrics(artifact)


def run_quantize(model: str, precision: str, backend: str = "llamacpp", base_precision: str = "f16",
                 options: Mapping[str, Any] | None = None, target: str = "cpu", output_dir: str | None = None,
                 calibration_path: str | None = None, experiment: str | None = None) -> str:
    get_target(target)
    out = ensure_writable(output_dir)
    with tracked_run(f"quantize-{precision}", experiment, tags=run_tags(target, "quantize", "candidate", [backend])):
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
    """Evaluate a logged model (``models:/…``, ``runs:/…``) or a local artifact file against ``model``."""
    get_target(target)
    gate_spec = parse_gates(gates)
    settings = settings or EvalSettings()
    with tracked_run("evaluate", experiment, tags=run_tags(target, "evaluate", "candidate")) as run:
        source = resolve_source(model)
        artifact = _artifact_from_uri(artifact_uri, source)
        evaluator = Evaluator(source, settings)
        try:
            evaluate_reference(evaluator, target, run.info.run_id)
            result = evaluate_candidate(evaluator, artifact, gate_spec, target, run.info.run_id)
        finally:
            evaluator.close()
        return result["metrics"]


def _artifact_from_uri(uri: str, source: SourceModel) -> Artifact:
    path = Path(uri)
    if path.suffix.lower() == ".gguf":
        from mlflow_edge.sources import validate_gguf

        if not path.is_file():
            raise EdgeError(f"GGUF file not found: {uri}")
        validate_gguf(path)
        return Artifact(path=path.resolve(), backend="llamacpp", format="gguf", precision=path.stem.split(".")[-1],
                        source_name=source.name, source_sha256=source.sha256,
                        num_parameters=source.num_parameters, files=(path.resolve(),))
    return flavors.artifact_from_model(uri)


def run_sweep(model: str = "demo", backend: str = "llamacpp", types: Sequence[str] = DEFAULT_SWEEP,
             base_precision: str = "f16", options: Mapping[str, Any] | None = None, target: str = "cpu",
             gates: str | Sequence[str] | None = None, policy: str = "min:size_mb",
             registered_model: str | None = None, settings: EvalSettings | None = None,
             calibration_path: str | None = None, experiment: str | None = None):
    """convert → a fixed sweep of one backend's quantization types → evaluate each against the reference → promote.

    The exhaustive counterpart of the search (``main``), for a grid chosen by hand."""
    from mlflow_edge import registry
    from mlflow_edge.report import comparison_table, write_report

    get_target(target)
    gate_spec = parse_gates(gates)
    registry.parse_policy(policy)
    if not types:
        raise EdgeError("no quantization types given")
    settings = settings or EvalSettings()
    calibration = calibration_text(calibration_path)
    check_disjoint(settings.text, calibration)
    with tracked_run("sweep", experiment, tags=run_tags(target, "sweep", "study", [backend])) as parent:
        study = parent.info.run_id
        mlflow.set_tag("mlflow_edge.study", study)
        source = resolve_source(model)
        log_new_params({"model": model, "source": source.name, "source.sha256": source.sha256, "backend": backend,
                           "target": target, "types": ",".join(types), "gates": str(gate_spec), "policy": policy,
                           **settings.params()})
        progress(f"source {source.name}: {source.num_parameters / 1e6:.1f} M parameters")
        base = convert(source, backend, base_precision)
        progress(f"converted to {backend} {base.precision} ({base.size_bytes / 1e6:.1f} MB)")
        evaluator = Evaluator(source, settings)
        rows = []
        try:
            reference = evaluate_reference(evaluator, target, study)
            rows.append({"name": "reference", "backend": "transformers", "precision": "fp32", "role": REFERENCE,
                         **reference})
            for i, qtype in enumerate(types, 1):
                progress(f"[{i}/{len(types)}] {qtype}")
                try:
                    with tracked_run(qtype, nested=True, tags=run_tags(target, study, "candidate", [backend])):
                        artifact = quantize(source, base, qtype, options, calibration)
                        result = evaluate_candidate(evaluator, artifact, gate_spec, target, study)
                except EdgeError as exc:
                    progress(f"{qtype} failed: {exc}")
                    continue
                rows.append({"name": qtype, "backend": backend, "precision": artifact.precision, "role": "candidate",
                             "gates": result["report"], **result["metrics"]})
        finally:
            evaluator.close()
        table = comparison_table(rows)
        with tempfile.TemporaryDirectory() as tmp:
            write_report(table, Path(tmp), title=f"{source.name} on {target}: {backend} sweep")
            mlflow.log_artifacts(tmp, artifact_path="report")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
        return promote_study(parent, study, source, target, gate_spec, policy, registered_model)


def promote_study(parent: mlflow.ActiveRun, study: str, source: SourceModel, target: str, gates: Gates,
                  policy: "str | Policy", registered_model: str | None):
    """Promote the best feasible candidate of ``study`` and record the outcome on the parent run."""
    from mlflow_edge import registry

    promotion = registry.promote(
        experiment_ids=[parent.info.experiment_id], study=study, target=target, gates=gates, policy=policy,
        registered_model=registered_model or f"{source.name}-edge",
    )
    progress(promotion.describe())
    mlflow.set_tags({"mlflow_edge.promotion": promotion.describe()[:5000]})
    return promotion
