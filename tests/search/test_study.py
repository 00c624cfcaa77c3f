"""The Optuna search end to end on the tiny model, real llama.cpp, a real sqlite MLflow store and Optuna RDB store."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlflow_edge import procs
from mlflow_edge.errors import EdgeError
from mlflow_edge.runs import end_runs_of_gone_processes
from mlflow_edge.search import SearchConfig, backends_for, run_search
from mlflow_edge.search.config import parse_objectives
from mlflow_edge.search.storage import fail_stale_trials, open_storage
from mlflow_edge.search.study import starting_points

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
        result = run_search(SearchConfig(str(tiny_source.path), trials=3, seed=0, gates=GATES, settings=settings,
                                         registered_model=MODEL_NAME))
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
        assert row["params.backend"] in backends_for("cpu") and pd.notna(row["metrics.accuracy_retention"])
    assert result["study"] == f"{parent.iloc[0]['params.source']}-cpu"


def test_search_keeps_optuna_study_next_to_mlflow_store(searched):
    folder, result = searched
    assert (folder / "optuna.db").is_file()
    trials = _optuna_trials(folder, result["study"])
    assert len(trials) == 3 and result["trials"] == 3 and result["new_trials"] == 3
    # a new study starts from each backend's usual defaults, the first of every backend first
    assert [t.params for t in trials] == starting_points(backends_for("cpu"))[:3]
    assert [t.params["backend"] for t in trials] == list(backends_for("cpu"))[:3]
    assert trials[0].params == {"backend": "llamacpp", "llamacpp.precision": "Q4_K_M", "llamacpp.imatrix": False}
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in trials)
    for trial in trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert len(trial.values) == 3 and list(trial.constraints) == ["gate.accuracy_retention_ge_0.9"]


def test_search_logs_pareto_report_and_promotes(searched):
    folder, result = searched
    artifacts = {f.path for f in MlflowClient().list_artifacts(result["run_id"], "search")}
    assert {"search/pareto.csv", "search/pareto.html", "search/pareto_front.png", "search/pareto_front.html",
            "search/trials.csv"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="search/pareto.csv")
    pareto = pd.read_csv(local)
    assert len(pareto) == len(result["pareto"]) >= 1
    assert (pareto["accuracy_retention"] >= 0.9).all()
    version = MlflowClient().get_model_version_by_alias(MODEL_NAME, "cpu-champion")
    assert version.tags["mlflow_edge.run_id"] in set(pareto["run_id"])
    # lineage: study, trial and source on the version
    assert version.tags["optuna.study"] == result["study"] and version.tags["mlflow_edge.study"] == result["study"]
    winner = pareto[pareto["run_id"] == version.tags["mlflow_edge.run_id"]].iloc[0]
    assert version.tags["mlflow_edge.trial"] == str(winner["trial"]) and len(version.tags["source.sha256"]) == 64
    assert "promoted" in result["promotion"]


def test_search_resumes_the_remaining_budget(searched, tiny_source, settings):
    folder, result = searched
    again = run_search(SearchConfig(str(tiny_source.path), trials=4, seed=0, gates=GATES, settings=settings,
                                    registered_model=MODEL_NAME))
    assert again["study"] == result["study"] and again["new_trials"] == 1 and again["trials"] == 4
    trials = _optuna_trials(folder, result["study"])
    assert len(trials) == 4
    table = _runs()
    children = table[table["tags.mlflow.parentRunId"] == again["run_id"]]
    twin = trials[3].user_attrs.get("twin_of")
    if twin is None:  # a new configuration: measured in its own nested run
        assert all(trials[3].params != t.params for t in trials[:3])
        assert sorted(children["tags.mlflow_edge.trial"].dropna()) == ["3"]
    else:  # TPE went back to a known configuration: its result is reused, nothing re-measured
        assert trials[3].params == trials[twin].params and trials[3].values == trials[twin].values
        assert children["tags.mlflow_edge.trial"].dropna().empty

    done = run_search(SearchConfig(str(tiny_source.path), trials=4, seed=0, gates=GATES, settings=settings,
                                   registered_model=MODEL_NAME))  # nothing left to run: nothing is measured again
    assert done["new_trials"] == 0 and "kept" in done["promotion"]
    assert _runs()[lambda t: t["tags.mlflow.parentRunId"] == done["run_id"]].empty  # not even the reference


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"trials": 0}, "budget of 0"),
    ({"target": "mars"}, "unknown target 'mars'"),
    ({"gates": "x>=1"}, "unknown metric 'x'"),
    ({"objectives": "max:speed"}, "bad objectives"),
    ({"target": "arm-cpu"}, "latency cannot be measured here; rerun with --accuracy-only true"),
    ({"target": "arm-cpu", "accuracy_only": True, "gates": "accuracy_retention>=0.9,latency_cv<=0.1"},
     "gate latency_cv<=0.1 is not measured in the accuracy/size-only mode"),
    ({"target": "arm-cpu", "accuracy_only": True, "gates": "speedup>=2"},
     "gate speedup>=2.0 is not measured in the accuracy/size-only mode"),
    ({"target": "arm-cpu", "accuracy_only": True, "gates": "accuracy_retention>=0.9", "policy": "max:decode_tok_s"},
     "policy 'max:decode_tok_s' needs metrics"),
    ({"timeout": 0}, "budget of 0"),
    ({"policy": "weighted:max:size_mb=0"}, "bad promotion policy"),
])
def test_bad_inputs_are_one_line_errors_and_register_nothing(tracking_uri, tiny_source, kwargs, message):
    with pytest.raises(EdgeError) as info:
        run_search(SearchConfig(str(tiny_source.path), **{"trials": 1, **kwargs}))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert MlflowClient().search_registered_models() == []
    assert not Path("optuna.db").exists()


STALE_CHILD = """
import sys, time
import optuna
from mlflow_edge.search.storage import open_storage

study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1]))

def objective(trial):
    time.sleep(1.5)  # past the first heartbeats (one a second)
    trial.set_user_attr("beating", True)
    time.sleep(float(sys.argv[2]))
    return 1.0

study.optimize(objective, n_trials=1)
"""


def _running(study: optuna.Study) -> list[int]:
    return [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]


def _wait_running(study: optuna.Study, count: int) -> None:
    """Until ``count`` trials run and each has recorded heartbeats (a trial killed before its first heartbeat has none
    and never turns stale by heartbeat)."""
    deadline = time.monotonic() + 60
    while len([t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
               if t.user_attrs.get("beating")]) < count:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_only_trials_of_a_stopped_search_are_failed(tmp_path, monkeypatch):
    """Heartbeats (one per second here) tell a live search's trial from a killed one's; on this host a trial whose
    owner process is gone is failed at once."""
    monkeypatch.setenv("MLFLOW_EDGE_TRIAL_HEARTBEAT", "1")  # stale after 4 s of silence
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    study.tell(study.ask(), 1.0)
    live = subprocess.Popen([sys.executable, "-c", STALE_CHILD, url, "30"])  # trial 1: a live search, 30 s long
    _wait_running(study, 1)
    killed = subprocess.Popen([sys.executable, "-c", STALE_CHILD, url, "60"])  # trial 2: killed mid-trial
    _wait_running(study, 2)
    killed.kill()
    killed.wait()
    owned = study.ask()  # trial 3: owned by a process of this host that is gone
    owned.set_user_attr("owner", f"{socket.gethostname()}:{killed.pid}-1")
    mine = study.ask()  # trial 4: owned by this (live) process, no heartbeat
    mine.set_user_attr("owner", procs.owner_tag())
    try:
        assert fail_stale_trials(study) == [3]  # at once: its owner is gone; the killed trial is not yet stale
        time.sleep(6)  # past the grace period
        assert fail_stale_trials(study) == [2]  # silent for longer than the grace period
        assert _running(study) == [1, 4]  # the live search's trial and ours are untouched
        assert fail_stale_trials(study) == []
    finally:
        live.kill()
        live.wait()


def test_runs_of_a_stopped_search_are_ended_and_live_ones_kept(tracking_uri):
    mlflow.set_experiment("edge")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"reference of a killed search": f"{socket.gethostname()}:{gone.stdout.strip()}-1",
              "live search": procs.owner_tag(), "other host": "elsewhere:1-1"}
    client = MlflowClient()
    ids = {}
    for name, owner in owners.items():
        run = client.create_run(mlflow.get_experiment_by_name("edge").experiment_id,
                                tags={"mlflow_edge.study": "s'1", "mlflow_edge.owner": owner})
        ids[name] = run.info.run_id
    ended = end_runs_of_gone_processes(mlflow.get_experiment_by_name("edge").experiment_id)
    assert ended == [ids["reference of a killed search"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"reference of a killed search": "FAILED", "live search": "RUNNING", "other host": "RUNNING"}
    assert client.get_run(ids["reference of a killed search"]).data.tags["mlflow_edge.error"].startswith(
        "interrupted")


def test_objectives():
    assert parse_objectives("multi")[0] == ("decode_tok_s", "maximize")
    assert parse_objectives("min:size_mb") == (("size_mb", "minimize"),)
    expected = (("size_mb", "minimize"), ("accuracy_retention", "maximize"))
    assert parse_objectives("multi", accuracy_only=True) == expected
    with pytest.raises(EdgeError, match="not measured in the accuracy/size-only mode"):
        parse_objectives("max:decode_tok_s", accuracy_only=True)


def test_a_failing_trial_fails_alone(tracking_uri, tiny_source, monkeypatch):
    from mlflow_edge.evaluation.harness import EvalSettings
    from mlflow_edge.search import objective as objective_module

    def broken(*args, **kwargs):
        raise EdgeError("llama.cpp could not quantize: simulated")

    monkeypatch.setattr(objective_module, "quantize", broken)
    with pytest.raises(EdgeError, match="no evaluated candidate runs"):
        run_search(SearchConfig(str(tiny_source.path), trials=1, gates=GATES, registered_model=MODEL_NAME,
                                settings=EvalSettings(window=64, windows=2, threads=2, repeats=2, prefill_tokens=64,
                                                      prompt_tokens=16, decode_tokens=8)))
    table = mlflow.search_runs(search_all_experiments=True)
    trial = table[table["tags.mlflow_edge.role"] == "candidate"]
    assert len(trial) == 1 and trial.iloc[0]["status"] == "FAILED"
    assert trial.iloc[0]["tags.mlflow_edge.error"] == "llama.cpp could not quantize: simulated"
    assert trial.iloc[0]["tags.mlflow_edge.trial"] == "0"
    state = optuna.load_study(study_name=f"{tiny_source.name}-cpu", storage=f"sqlite:///{Path.cwd() / 'optuna.db'}")
    assert [t.state for t in state.trials] == [optuna.trial.TrialState.FAIL]
    assert state.trials[0].user_attrs["error"] == "llama.cpp could not quantize: simulated"
    assert MlflowClient().search_registered_models() == []


def _study(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path.cwd() / 'optuna.db'}")


def test_a_trial_failing_the_accuracy_gate_on_the_first_windows_is_pruned(tracking_uri, tiny_source, settings):
    result = None
    with pytest.raises(EdgeError, match="no evaluated candidate runs"):  # 2 windows: the first with an interval
        result = run_search(SearchConfig(str(tiny_source.path), trials=2, gates="accuracy_retention>=1.5",
                                         settings=dataclasses.replace(settings, windows=4), screen_windows=2,
                                         registered_model=MODEL_NAME))
    assert result is None
    trials = _study(f"{tiny_source.name}-cpu").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(t.constraints["gate.accuracy_retention_ge_1.5"] > 0 for t in trials)
    table = mlflow.search_runs(search_all_experiments=True)
    pruned = table[table["tags.mlflow_edge.role"] == "candidate"]
    assert list(pruned["status"]) == ["KILLED", "KILLED"]
    assert pruned["tags.mlflow_edge.pruned"].str.startswith("pruned after 2 of 4 windows: accuracy_retention").all()
    assert pruned["metrics.screen.accuracy_retention_hi"].lt(1.5).all()  # even the optimistic bound fails
    assert pruned["metrics.decode_tok_s"].isna().all() if "metrics.decode_tok_s" in pruned else True
    assert "tags.mlflow_edge.model_uri" not in pruned or pruned["tags.mlflow_edge.model_uri"].isna().all()
    assert MlflowClient().search_registered_models() == []


def test_without_screening_the_same_trial_is_measured_in_full(tracking_uri, tiny_source, settings):
    with pytest.raises(EdgeError, match="none of 1 candidates passed the gates"):
        run_search(SearchConfig(str(tiny_source.path), trials=1, gates="accuracy_retention>=1.5", settings=settings,
                                screen_windows=0, registered_model=MODEL_NAME))
    (trial,) = _study(f"{tiny_source.name}-cpu").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.constraints["gate.accuracy_retention_ge_1.5"] > 0


def test_a_repeated_configuration_reuses_the_earlier_result(tracking_uri, tiny_source, settings):
    name = f"{tiny_source.name}-cpu"
    study = optuna.create_study(storage=f"sqlite:///{Path.cwd() / 'optuna.db'}", study_name=name,
                                directions=["maximize", "minimize", "maximize"])
    for _ in range(2):
        study.enqueue_trial({"backend": "llamacpp", "llamacpp.precision": "Q8_0", "llamacpp.imatrix": False})
    result = run_search(SearchConfig(str(tiny_source.path), trials=2, gates=GATES, settings=settings,
                                     registered_model=MODEL_NAME))
    first, second = _study(name).trials
    assert second.user_attrs["twin_of"] == 0 and second.values == first.values
    assert second.user_attrs["run_id"] == first.user_attrs["run_id"] and second.constraints == first.constraints
    table = mlflow.search_runs(search_all_experiments=True)
    assert list(table[table["tags.mlflow_edge.role"] == "candidate"]["tags.mlflow_edge.trial"]) == ["0"]
    assert len(result["pareto"]) == 1


def test_accuracy_only_mode_for_a_target_whose_hardware_is_absent(tracking_uri, tiny_source, settings):
    result = run_search(SearchConfig(str(tiny_source.path), target="arm-cpu", trials=2, accuracy_only=True,
                                     settings=settings, policy="weighted:min:size_mb=1,max:accuracy_retention=1",
                                     registered_model=MODEL_NAME,
                                     gates="accuracy_retention>=0.5,speedup>=2.0|compression_ratio>=1.5"))
    parent = mlflow.get_run(result["run_id"])
    assert parent.data.tags["mlflow_edge.measured"] == "accuracy,size"
    assert parent.data.tags["gates.dropped"] == "speedup>=2.0"
    assert parent.data.params["gates"] == "accuracy_retention>=0.5,compression_ratio>=1.5"
    table = mlflow.search_runs(search_all_experiments=True)
    finished = table[(table["tags.mlflow_edge.role"] == "candidate") & (table["status"] == "FINISHED")]
    assert len(finished) >= 1 and (finished["params.eval.speed"] == "false").all()
    assert finished["metrics.accuracy_retention"].notna().all() and finished["metrics.size_mb"].notna().all()
    for absent in ("metrics.decode_tok_s", "metrics.speedup", "metrics.peak_rss_mb", "metrics.latency_cv"):
        assert absent not in finished or finished[absent].isna().all()
    assert _study(f"{tiny_source.name}-arm-cpu").metric_names == ["size_mb", "accuracy_retention"]
    version = MlflowClient().get_model_version_by_alias(MODEL_NAME, "arm-cpu-champion")
    assert version.tags["policy"] == "weighted:min:size_mb=1,max:accuracy_retention=1"
