"""The ``edge`` MLflow evaluator end to end: a real Q8_0 GGUF of the tiny model, logged with the gguf flavor,
measured by ``mlflow.models.evaluate`` against its source in a real sqlite store."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_edge import artifacts
from mlflow_edge.evaluation.data import evaluation_text
from mlflow_edge.evaluation.mlflow_evaluator import EdgeEvaluator
from mlflow_edge.flavors import log_artifact_model
from mlflow_edge.metrics import ARTIFACT_METRICS

MEASURED = set(ARTIFACT_METRICS) - {"speedup_vs_base"}  # needs the backend's base artifact, which a logged model lacks

FAST = {"window": 64, "windows": 2, "repeats": 2, "threads": 2, "prefill_tokens": 64, "prompt_tokens": 16,
        "decode_tokens": 8}


@pytest.fixture()
def logged_q8(tracking_uri, tiny_source):
    base = artifacts.convert(tiny_source, "llamacpp", "f16")
    artifact = artifacts.quantize(tiny_source, base, "Q8_0")
    with mlflow.start_run():
        info = log_artifact_model(artifact)
    return info


def text_frame() -> pd.DataFrame:
    return pd.DataFrame({"text": [evaluation_text().text()[:20000]]})


def test_edge_evaluator_is_registered_and_needs_a_source():
    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry

    assert isinstance(_model_evaluation_registry.get_evaluator("edge"), EdgeEvaluator)
    assert EdgeEvaluator.can_evaluate(model_type="text", evaluator_config={"source": "demo"})
    assert not EdgeEvaluator.can_evaluate(model_type="text", evaluator_config={})


def test_evaluate_logs_every_conventions_metric(logged_q8, tiny_source):
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(
            logged_q8.model_uri, data=text_frame(), model_type="text", evaluators="edge",
            evaluator_config={"source": str(tiny_source.path), **FAST},  # a list of names needs {"edge": {...}}
        )
    assert MEASURED <= set(result.metrics)
    assert result.metrics["size_mb"] > 0 and result.metrics["compression_ratio"] > 1.5
    assert 0.0 < result.metrics["top1_agreement"] <= 1.0
    logged = MlflowClient().get_run(run.info.run_id).data
    assert MEASURED <= set(logged.metrics)
    assert logged.metrics["perplexity"] == pytest.approx(result.metrics["perplexity"])
    assert logged.params["backend"] == "llamacpp"
    assert logged.params["format"] == "gguf"
    assert logged.params["precision"] == "Q8_0"
    assert logged.params["eval.window"] == "64" and logged.params["eval.windows"] == "2"
    assert logged.params["eval.dataset"].startswith("mlflow-")  # the text came from the data, not the built-in
    # MLflow links the returned metrics to the logged model too
    model = mlflow.get_logged_model(logged_q8.model_id)
    assert {m.key for m in model.metrics} >= MEASURED


def test_bad_source_is_a_one_line_error_naming_it(logged_q8, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(MlflowException) as info:
        mlflow.models.evaluate(
            logged_q8.model_uri, data=text_frame(), model_type="text", evaluators=["edge"],
            evaluator_config={"edge": {"source": str(missing), **FAST}},
        )
    message = info.value.message
    assert str(missing) in message and "\n" not in message
