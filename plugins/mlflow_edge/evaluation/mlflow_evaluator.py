"""An MLflow model evaluator: ``mlflow.models.evaluate(..., evaluators=["edge"])`` logs the conventions' metrics.

Registered under the ``mlflow.model_evaluator`` entry point as ``edge``. It measures a model logged with an
mlflow-edge flavor against its unquantized source with the same harness as ``mlflow-edge evaluate``::

    result = mlflow.models.evaluate(
        model_info.model_uri,
        data=pd.DataFrame({"text": [evaluation_text]}),   # a text column; anything else: the built-in text
        model_type="text",                                # MLflow refuses model_type=None without extra_metrics
        evaluators=["edge"],
        evaluator_config={"edge": {"source": "demo", "window": 256, "windows": 8}},
    )

(With ``evaluators="edge"`` as a plain string, MLflow also takes the config flat: ``{"source": "demo", …}``.)

``evaluator_config`` keys: ``source`` (required: ``demo``, a hub id, a folder or a ``.gguf`` file), optional
``model_uri`` (which logged model to measure; by default the one MLflow evaluates), ``target`` (default ``cpu``) and
the evaluation settings ``window``, ``windows``, ``threads``, ``repeats``, ``prefill_tokens``, ``prompt_tokens``,
``decode_tokens``. The metrics and the params (``backend``, ``format``, ``precision``, …, ``eval.*``) are logged on
the evaluation run; MLflow itself links the returned metrics to the logged model.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric, Param
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException
from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator
from mlflow.tracking import MlflowClient

from mlflow_edge.errors import EdgeError

SOURCE_KEY = "source"
SETTING_KEYS = ("window", "windows", "threads", "repeats", "prefill_tokens", "prompt_tokens", "decode_tokens")
KNOWN_KEYS = {SOURCE_KEY, "model_uri", "target", *SETTING_KEYS}


def _fail(message: str) -> MlflowException:
    return MlflowException(message.splitlines()[0] if message else "mlflow-edge evaluation failed",
                           error_code=INVALID_PARAMETER_VALUE)


class EdgeEvaluator(ModelEvaluator):
    """Measures a model of an mlflow-edge flavor against its source model (see the module docstring)."""

    name = "edge"

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        # MLflow 3.17 passes only model_type and evaluator_config here (never the model), so the source model in
        # the config is what marks a call as ours; any model_type is fine, the harness does not depend on it.
        return isinstance(evaluator_config, Mapping) and bool(str(evaluator_config.get(SOURCE_KEY) or "").strip())

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None, extra_metrics=None,
                 custom_artifacts=None, predictions=None, **kwargs) -> EvaluationResult:
        config = dict(evaluator_config or {})
        try:
            return self._evaluate(config, dataset, run_id, model, kwargs.get("model_id"))
        except EdgeError as exc:
            raise _fail(str(exc)) from exc

    def _evaluate(self, config: dict[str, Any], dataset: Any, run_id: str, model: Any,
                  model_id: str | None) -> EvaluationResult:
        from mlflow_edge import flavors
        from mlflow_edge.evaluation.data import evaluation_text
        from mlflow_edge.evaluation.harness import EvalSettings, Evaluator
        from mlflow_edge.runs import artifact_params
        from mlflow_edge.sources import resolve_source
        from mlflow_edge.targets import get_target

        unknown = sorted(set(config) - KNOWN_KEYS)
        if unknown:
            raise EdgeError(f"unknown edge evaluator_config key(s): {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(KNOWN_KEYS))})")
        spec = str(config.get(SOURCE_KEY) or "").strip()
        if not spec:
            raise EdgeError("the edge evaluator needs evaluator_config['source'] (the source model of the artifact)")
        target = get_target(str(config.get("target", "cpu"))).name
        settings_kwargs = {key: _positive_int(key, config[key]) for key in SETTING_KEYS if key in config}
        model_uri = _model_uri(config, model, model_id)

        source = resolve_source(spec)
        with tempfile.TemporaryDirectory(prefix="mlflow-edge-evaluate-") as tmp:
            (Path(tmp) / "model").mkdir()
            artifact = flavors.artifact_from_model(model_uri, dst_path=str(Path(tmp) / "model"))
            text_file = _write_text(dataset, Path(tmp))
            settings = EvalSettings(text=evaluation_text(text_file), **settings_kwargs)
            evaluator = Evaluator(source, settings, workdir=Path(tmp) / "work")
            evaluator.evaluate_reference()
            metrics = {k: float(v) for k, v in evaluator.evaluate(artifact).items()}
            params = {**artifact_params(artifact, target), **settings.params()}  # eval.sha256 reads the text file
        _log(run_id, metrics, params)
        return EvaluationResult(metrics=metrics, artifacts={}, run_id=run_id)


def _positive_int(key: str, value: Any) -> int:
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise EdgeError(f"evaluator_config['{key}'] must be an integer, got {value!r}") from None
    return number


def _model_uri(config: Mapping[str, Any], model: Any, model_id: str | None) -> str:
    """The logged model to measure: ``model_uri`` in the config, else the model MLflow loaded for ``evaluate``."""
    if config.get("model_uri"):
        return str(config["model_uri"])
    meta = getattr(model, "metadata", None)
    model_id = model_id or getattr(model, "model_id", None) or getattr(meta, "model_id", None)
    if model_id:
        return f"models:/{model_id}"
    if meta is not None and getattr(meta, "run_id", None) and getattr(meta, "artifact_path", None):
        return f"runs:/{meta.run_id}/{meta.artifact_path}"
    raise EdgeError("cannot tell which logged model to evaluate: pass a model URI to mlflow.models.evaluate or "
                    "evaluator_config['model_uri']")


def _write_text(dataset: Any, folder: Path) -> Path | None:
    """The strings of the dataset's first column joined into a text file, or None (the built-in text)."""
    frame = getattr(dataset, "features_data", None)
    if frame is None or not hasattr(frame, "columns") or len(frame.columns) == 0 or len(frame) == 0:
        return None
    column = frame.iloc[:, 0]
    if not all(isinstance(value, str) for value in column):
        return None
    text = "\n".join(column)
    if not text.strip():
        raise EdgeError("the evaluation data's text column is empty")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(dataset, "name", "") or "")).strip("._") or "data"
    path = folder / f"mlflow-{name}.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _log(run_id: str, metrics: Mapping[str, float], params: Mapping[str, Any]) -> None:
    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
        params=[Param(key, str(value)) for key, value in params.items() if key not in existing],
    )
