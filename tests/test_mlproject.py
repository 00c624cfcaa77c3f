"""`mlflow run` of the MLproject entry points, as a user runs them (subprocess, real sqlite store)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def mlflow_run(entry: str, uri: str, *params: str, wait: bool = True):
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env = {**inherited, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
            "--experiment-name", "edge-project"]
    for param in params:
        args += ["-P", param]
    if not wait:  # its own process group, so a test can kill it with its children like an interrupted user
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sweep_entry_point_registers_a_champion(tracking_uri, tiny_source, tmp_path):
    mlflow.create_experiment("edge-project", artifact_location=str(tmp_path / "artifacts"))
    done = mlflow_run("sweep", tracking_uri, f"model={tiny_source.path}", "types=Q4_0,Q8_0", "windows=2",
                      "repeats=2", "gates=accuracy_retention>=0.9", "registered_model=tiny-project")
    assert done.returncode == 0, done.stderr[-3000:]
    champion = MlflowClient().get_model_version_by_alias("tiny-project", "cpu-champion")
    assert champion.tags["precision"] == "Q4_0"
    runs = mlflow.search_runs(experiment_names=["edge-project"])
    assert set(runs["status"]) == {"FINISHED"} and len(runs) == 4  # study, reference, two candidates


@pytest.mark.slow
def test_main_entry_point_converts_searches_and_promotes(tracking_uri, tiny_source, tmp_path):
    mlflow.create_experiment("edge-project", artifact_location=str(tmp_path / "artifacts"))
    done = mlflow_run("main", tracking_uri, f"model={tiny_source.path}", "trials=2", "windows=2", "repeats=2",
                      "gates=accuracy_retention>=0.9", "registered_model=tiny-main")
    assert done.returncode == 0, done.stderr[-3000:]
    champion = MlflowClient().get_model_version_by_alias("tiny-main", "cpu-champion")
    runs = mlflow.search_runs(experiment_names=["edge-project"])
    parent = runs[runs["tags.mlflow_edge.role"] == "study"]
    assert len(parent) == 1 and parent.iloc[0]["tags.mlflow.project.entryPoint"] == "main"
    assert parent.iloc[0]["params.trials"] == "2" and "base llamacpp f16" in done.stderr.lower()
    assert champion.tags["mlflow_edge.run_id"] in set(runs[runs["tags.mlflow_edge.role"] == "candidate"]["run_id"])
    # the flow leaves the readiness report as the version's description and on the champion's run
    assert champion.description.startswith("# Readiness: tiny-main version")
    assert "mlflow-edge serve models:/tiny-main@cpu-champion" in champion.description
    report = mlflow.artifacts.load_dict(f"runs:/{champion.tags['mlflow_edge.run_id']}/readiness/readiness.json")
    assert report["gates"]["passed"] and report["comparison"]["reference"]["run_id"]


@pytest.mark.slow
def test_entry_point_failure_marks_the_run_failed(tracking_uri, tmp_path):
    mlflow.create_experiment("edge-project", artifact_location=str(tmp_path / "artifacts"))
    done = mlflow_run("convert", tracking_uri, "model=./no/such/model")
    assert done.returncode != 0
    assert "mlflow-edge: error: model path not found: ./no/such/model" in done.stderr
    run = mlflow.search_runs(experiment_names=["edge-project"]).iloc[0]
    assert run["status"] == "FAILED"
    assert run["tags.mlflow_edge.error"] == "model path not found: ./no/such/model"


