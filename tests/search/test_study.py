"""The Optuna search end to end on the tiny model, real llama.cpp, a real sqlite MLflow store and Optuna RDB store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlflow_edge.backends.base import EdgeError
from mlflow_edge.search import run_search
from mlflow_edge.gates import parse_gates
from mlflow_edge.search.study import STALE_REASON, fail_stale_trials, gate_violations, parse_objectives

GATES = "accuracy_retention>=0.9"
MODEL_NAME = "tiny-search-edge"


@pytest.fixture(scope="module")
def settings():
    """The conftest ``tiny_settings`` (function-scoped there), for the module-scoped search."""
    from mlflow_edge.evaluation.harness import EvalSettings

    return EvalSettings(window=64, windows=2, threads=2, repeats=2, prefill_tokens=64, prompt_tokens=16,
                        decode_tokens=8)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_source, settings, use_sqlite_store):
    """One store for this module: a 3-trial search. Yields (store folder, run_search's result)."""
    folder = tmp_path_factory.mktemp("search-store")
    with pytest.MonkeyPatch.context() as patch:
        use_sqlite_store(folder, patch)
        result = run_search(str(tiny_source.path), trials=3, seed=0, gates=GATES, settings=settings,
                            registered_model=MODEL_NAME)
        yield folder, result
        mlflow.end_run()


def _runs() -> pd.DataFrame:
    return mlflow.search_runs(experiment_names=["mlflow-edge"])


def _optuna_trials(folder: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}").trials


def test_search_logs_parent_reference_and_one_run_per_trial(searched):
    folder, result = searched
    table = _runs()
    parent = table[table["run_id"] == result["run_id"]]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    assert parent.iloc[0]["tags.mlflow_edge.role"] == "study"
    children = table[table["tags.mlflow.parentRunId"] == result["run_id"]]
    assert sorted(children["tags.mlflow_edge.role"]) == ["candidate"] * 3 + ["reference"]
    trials = children[children["tags.mlflow_edge.role"] == "candidate"]
    assert sorted(trials["tags.mlflow_edge.trial"]) == ["0", "1", "2"]
    assert set(trials["status"]) <= {"FINISHED", "FAILED"}
    assert set(trials["tags.optuna.study"]) == {result["study"]}
    for _, row in trials[trials["status"] == "FINISHED"].iterrows():
        assert row["params.backend"] == "llamacpp" and pd.notna(row["metrics.accuracy_retention"])
    assert result["study"] == f"{parent.iloc[0]['params.source']}-cpu"


def test_search_keeps_optuna_study_next_to_mlflow_store(searched):
    folder, result = searched
    assert (folder / "optuna.db").is_file()
    trials = _optuna_trials(folder, result["study"])
    assert len(trials) == 3 and result["trials"] == 3 and result["new_trials"] == 3
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in trials)
    for trial in trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert len(trial.values) == 3 and len(trial.user_attrs["constraints"]) == 1


def test_search_logs_pareto_report_and_promotes(searched):
    folder, result = searched
    artifacts = {f.path for f in MlflowClient().list_artifacts(result["run_id"], "search")}
    assert {"search/pareto.csv", "search/pareto.html", "search/pareto_front.png"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="search/pareto.csv")
    pareto = pd.read_csv(local)
    assert len(pareto) == len(result["pareto"]) >= 1
    assert (pareto["gates"] == "pass").all() and (pareto["accuracy_retention"] >= 0.9).all()
    version = MlflowClient().get_model_version_by_alias(MODEL_NAME, "cpu-champion")
    assert version.tags["mlflow_edge.run_id"] in set(pareto["run_id"])
    assert "promoted" in result["promotion"]


def test_search_resumes_the_remaining_budget(searched, tiny_source, settings):
    folder, result = searched
    again = run_search(str(tiny_source.path), trials=4, seed=0, gates=GATES, settings=settings,
                       registered_model=MODEL_NAME)
    assert again["study"] == result["study"] and again["new_trials"] == 1 and again["trials"] == 4
    trials = _optuna_trials(folder, result["study"])
    assert len(trials) == 4
    assert trials[3].params != trials[0].params  # the resumed sampler does not replay the first draws
    table = _runs()
    children = table[table["tags.mlflow.parentRunId"] == again["run_id"]]
    assert sorted(children["tags.mlflow_edge.trial"].dropna()) == ["3"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"trials": 0}, "budget of 0"),
    ({"target": "mars"}, "unknown target 'mars'"),
    ({"gates": "x>=1"}, "unknown metric 'x'"),
    ({"objectives": "max:speed"}, "bad objectives"),
    ({"target": "intel-cpu"}, "no installed backend"),
])
def test_bad_inputs_are_one_line_errors_and_register_nothing(tracking_uri, tiny_source, kwargs, message):
    with pytest.raises(EdgeError) as info:
        run_search(str(tiny_source.path), **{"trials": 1, **kwargs})
    assert message in str(info.value) and "\n" not in str(info.value)
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert MlflowClient().search_registered_models() == []
    assert not Path("optuna.db").exists()


def test_stale_running_trials_are_failed(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    study.tell(study.ask(), 1.0)
    study.ask()  # left RUNNING, as by a killed process
    assert fail_stale_trials(study) == [1]
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert study.trials[1].user_attrs["error"] == STALE_REASON


def test_objectives_and_gate_violations():
    assert parse_objectives("multi")[0] == ("decode_tok_s", "maximize")
    assert parse_objectives("min:size_mb") == (("size_mb", "minimize"),)
    gates = parse_gates("accuracy_retention>=0.9,speedup>=2.0|compression_ratio>=2.0")
    assert gate_violations(gates, {"accuracy_retention": 0.95, "speedup": 1.0, "compression_ratio": 3.0}) == [0.0, 0.0]
    low = gate_violations(gates, {"accuracy_retention": 0.45, "speedup": 1.0, "compression_ratio": 1.5})
    assert low[0] == pytest.approx(0.5) and low[1] == pytest.approx(0.25)
    assert gate_violations(gates, {"speedup": 3.0})[0] > 0


def test_a_failing_trial_fails_alone(tracking_uri, tiny_source, monkeypatch):
    from mlflow_edge.search import study as study_module

    def broken(*args, **kwargs):
        raise EdgeError("llama.cpp could not quantize: simulated")

    monkeypatch.setattr(study_module, "quantize", broken)
    with pytest.raises(EdgeError, match="no finished candidate runs"):
        run_search(str(tiny_source.path), trials=1, gates=GATES, registered_model=MODEL_NAME,
                   settings=study_module.EvalSettings(window=64, windows=2, threads=2, repeats=2, prefill_tokens=64,
                                                      prompt_tokens=16, decode_tokens=8))
    table = mlflow.search_runs(search_all_experiments=True)
    trial = table[table["tags.mlflow_edge.role"] == "candidate"]
    assert len(trial) == 1 and trial.iloc[0]["status"] == "FAILED"
    assert trial.iloc[0]["tags.mlflow_edge.error"] == "llama.cpp could not quantize: simulated"
    assert trial.iloc[0]["tags.mlflow_edge.trial"] == "0"
    state = optuna.load_study(study_name=f"{tiny_source.name}-cpu", storage=f"sqlite:///{Path.cwd() / 'optuna.db'}")
    assert [t.state for t in state.trials] == [optuna.trial.TrialState.FAIL]
    assert state.trials[0].user_attrs["error"] == "llama.cpp could not quantize: simulated"
    assert MlflowClient().search_registered_models() == []
