"""One study, three processes (a coordinator and two `--worker`s) on a real PostgreSQL Optuna storage and a real
`mlflow server` on PostgreSQL; one worker is killed mid-trial. Nothing is lost, nothing measured twice, one champion."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from mlflow_edge.search.space import counts_as_measured
from tests.scaleout.processes import FAST, cli, start, wait_for_text

pytestmark = pytest.mark.slow

BUDGET = 6
STUDY = "distributed"
MODEL_NAME = "distributed-edge"
EXPERIMENT = "distributed"
"""This module's experiment on the session's tracking server (other modules search on it too)."""


def _running_trial_of(study: optuna.Study, pid: int) -> optuna.trial.FrozenTrial | None:
    """The trial ``pid`` is measuring: RUNNING, owned by it, its MLflow run started."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if f":{pid}-" in trial.user_attrs.get("owner", "") and "run_id" in trial.user_attrs:
            return trial
    return None


@pytest.fixture(scope="module")
def distributed(postgres, tracking_server, tiny_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    storage = postgres.database("optuna_distributed")
    # a cache of its own: with the session's (the reference's metrics and the trials' artifacts already built by
    # other tests) the coordinator can measure the whole budget before a worker has loaded the source
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server, "MLFLOW_REGISTRY_URI": tracking_server,
           "MLFLOW_EDGE_TRIAL_HEARTBEAT": "2", "MLFLOW_EDGE_CACHE": str(folder / "cache")}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    common = ["--model", str(tiny_source.path), "--storage", storage, "--study-name", STUDY]
    workers = [start(["search", "--worker", *common], folder / f"worker{i}.log", env, folder) for i in (1, 2)]
    for i, worker in enumerate(workers, 1):  # both wait for the study before the coordinator creates it
        wait_for_text(folder / f"worker{i}.log", "waiting for a coordinator", worker)
    coordinator = start(["search", *common, "--backends", "llamacpp", "--trials", str(BUDGET), "--gates",
                          "accuracy_retention>=0.5", "--screen-windows", "0", "--registered-model", MODEL_NAME,
                          "--experiment", EXPERIMENT, *FAST], folder / "coordinator.log", env, folder)
    victim, killed = workers[0], None
    deadline = time.monotonic() + 600
    watcher = optuna.storages.RDBStorage(storage)  # one connection pool for the whole watch
    while killed is None and time.monotonic() < deadline and victim.poll() is None:
        try:
            killed = _running_trial_of(optuna.load_study(study_name=STUDY, storage=watcher), victim.pid)
        except KeyError:  # the coordinator has not created the study yet
            pass
        time.sleep(0.2)
    assert killed is not None, "the worker never ran a trial:\n" + (folder / "worker1.log").read_text()[-3000:]
    os.killpg(victim.pid, signal.SIGKILL)
    codes = [p.wait(timeout=900) for p in (coordinator, workers[1])]
    logs = {p.name: p.read_text() for p in folder.glob("*.log")}
    assert codes == [0, 0], "\n".join(f"== {k}\n{v[-3000:]}" for k, v in logs.items())
    mlflow.set_tracking_uri(tracking_server)
    mlflow.set_registry_uri(tracking_server)
    yield optuna.load_study(study_name=STUDY, storage=watcher), killed, logs
    mlflow.set_tracking_uri(None)


def test_the_killed_trial_is_measured_again_and_nothing_is_lost(distributed):
    study, killed, _ = distributed
    trials = study.get_trials(deepcopy=False)
    assert trials[killed.number].state == TrialState.FAIL  # failed as stale
    measured = [t for t in trials if counts_as_measured(t) and t.state != TrialState.WAITING]
    assert BUDGET <= len(measured) <= BUDGET + 1  # at most one over: two workers may start the last trial together
    again = [t for t in measured if t.params == killed.params]
    assert len(again) == 1 and again[0].system_attrs["retry_history"] == [killed.number]
    assert all(t.state != TrialState.RUNNING for t in trials)


def test_no_configuration_is_measured_twice(distributed):
    study, _, _ = distributed
    measured = [t for t in study.get_trials(deepcopy=False) if counts_as_measured(t) and "twin_of" not in t.user_attrs]
    configs = [tuple(sorted(t.params.items())) for t in measured]
    assert len(configs) == len(set(configs))


def test_every_process_ran_trials_under_one_parent_reference_and_champion(distributed):
    study, killed, logs = distributed
    owners = {t.user_attrs["owner"].split("-")[0] for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(owners) >= 2  # the coordinator's and the surviving worker's (the killed one's first trial died)
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")  # the workers' runs too
    roles = [r.data.tags.get("mlflow_edge.role") for r in runs]
    assert roles.count("study") == 1 and roles.count("reference") == 1  # once per study, not per worker
    assert roles.count("worker") == 2  # one run per worker, under the study's parent
    parent = next(r for r in runs if r.data.tags.get("mlflow_edge.role") == "study")
    workers = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow_edge.role") == "worker"}
    assert {r.data.tags["mlflow.parentRunId"] for r in workers.values()} == {parent.info.run_id}
    candidates = [r for r in runs if r.data.tags.get("mlflow_edge.role") == "candidate"]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in candidates}
    assert parent.info.run_id in parents and parents - {parent.info.run_id} <= set(workers) and len(parents) >= 2
    dead = next(r for r in candidates if r.info.run_id == killed.user_attrs.get("run_id"))
    assert dead.info.status == "FAILED"
    versions = MlflowClient().search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 1  # the SQL store leaves ModelVersion.aliases empty in searches: ask the model
    assert MlflowClient().get_registered_model(MODEL_NAME).aliases == {"cpu-champion": versions[0].version}
    assert "worker of study distributed: ran trial(s)" in logs["worker2.log"]


def test_a_worker_of_another_target_or_without_a_storage_is_refused(distributed, tiny_source, postgres):
    study, _, _ = distributed
    storage = postgres.database("optuna_refusals")
    optuna.create_study(storage=storage, study_name=STUDY).set_user_attr("mlflow_edge", {"target": "cpu"})
    other = subprocess.run(cli("search", "--worker", "--model", str(tiny_source.path), "--storage", storage,
                                "--study-name", STUDY, "--target", "arm-cpu"), capture_output=True, text=True)
    assert other.returncode == 1
    assert other.stderr.strip() == ("mlflow-edge: error: study 'distributed' searches target 'cpu'; this worker was "
                                    "started for 'arm-cpu' (use that target's study)")
    no_storage = subprocess.run(cli("search", "--worker"), capture_output=True, text=True)
    assert "mlflow-edge: error: --worker needs the coordinator's --storage" in no_storage.stderr
