"""``mlflow run -b azureml``: MLflow's own ``mlflow.projects.run`` submits the MLproject entry point as one Azure ML
command job to a fake MLClient, reports a launcher run in the caller's store, and follows the job's state."""

from __future__ import annotations

import json
import shlex
from importlib.metadata import EntryPoint
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.exceptions import ExecutionException
from mlflow.projects.backend import loader
from packaging.requirements import Requirement

from mlflow_edge.azureml import project_backend
from mlflow_edge.azureml.environment import requirements
from mlflow_edge.azureml.project_backend import JOB_TAG, STUDIO_TAG, AzureMLBackend, AzureMLSubmittedRun
from mlflow_edge.errors import EdgeError

from .conftest import JOB_NAME, STUDIO_URL, FakeMLClient

REPO = Path(__file__).resolve().parents[2]
PARAMS = {"target": "arm-cpu", "trials": "3", "policy": "max:decode_tok_s"}


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``azureml`` backend as MLflow's loader finds it: from the installed distribution's entry points once
    setup.cfg declares it, added here until then (the same target either way)."""
    real = loader.get_entry_points

    def with_ours(group: str) -> list[EntryPoint]:
        found = list(real(group))
        if group == loader.ENTRYPOINT_GROUP_NAME and not any(e.name == "azureml" for e in found):
            found.append(EntryPoint("azureml", "mlflow_edge.azureml.project_backend:AzureMLBackend", group))
        return found

    monkeypatch.setattr(loader, "get_entry_points", with_ours)
    monkeypatch.setattr(AzureMLSubmittedRun, "poll_seconds", 0.0)


def _inject(monkeypatch: pytest.MonkeyPatch, fake: FakeMLClient) -> list:
    asked: list = []
    monkeypatch.setattr(project_backend, "workspace_client", lambda path=None: asked.append(path) or fake)
    return asked


def _run(backend_config, synchronous: bool = False, params=PARAMS):
    return mlflow.projects.run(uri=str(REPO), entry_point="search", parameters=params, backend="azureml",
                               backend_config=backend_config, synchronous=synchronous)


def _expected_search_command() -> str:
    """The MLproject ``search`` command with PARAMS and the defaults substituted, shell-quoted (as MLflow does)."""
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["search"]
    values = {name: p.get("default") for name, p in spec["parameters"].items()} | PARAMS
    return spec["command"].format(**{name: shlex.quote(str(value)) for name, value in values.items()})


def test_the_loader_finds_the_backend():
    assert isinstance(loader.load_backend("azureml"), AzureMLBackend)


def test_run_submits_the_entry_point_as_one_command_job(tracking_uri, monkeypatch: pytest.MonkeyPatch):
    fake = FakeMLClient(["Queued", "Running", "Completed"])
    asked = _inject(monkeypatch, fake)
    submitted = _run({"compute": "cpu-cluster"})
    assert asked == [None]
    [(job, kwargs)] = fake.jobs.created
    assert kwargs == {"experiment_name": "Default"}
    # What create_or_update sends before it uploads the code and registers the environment (it calls _to_job itself).
    command_job = job._to_job()
    body = command_job._to_rest_object().as_dict()["properties"]
    command = _expected_search_command()
    assert command.startswith("python flows/search.py --model demo --target arm-cpu --backends '' --trials 3 "
                              "--timeout '' --objectives multi --gates '' --fidelity '' --gate-confidence '' "
                              "--policy max:decode_tok_s --seed 0")
    assert body["command"] == "pip install --no-deps . && " + command
    assert (body["jobType"], body["computeId"], body["experimentName"], body["codeId"], body["displayName"]) == (
        "Command", "cpu-cluster", "Default", str(REPO), "mlflow-edge search")
    assert body["environmentVariables"] == {"MLFLOW_EXPERIMENT_NAME": "Default"}
    assert body["inputs"] == {} and body["outputs"] == {}
    environment = command_job.environment
    assert environment.image == "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04"
    pip = environment.conda_file["dependencies"][2]["pip"]
    assert pip == requirements(project_backend.extras_for(["arm-cpu"]))
    assert {Requirement(line).name for line in pip} > {"mlflow", "optuna", "click"}

    launcher = mlflow.get_run(submitted.run_id)
    assert launcher.data.tags[JOB_TAG] == JOB_NAME and launcher.data.tags[STUDIO_TAG] == STUDIO_URL
    assert launcher.data.tags["mlflow.project.backend"] == "azureml"
    assert launcher.data.tags["mlflow.project.entryPoint"] == "search"
    assert launcher.data.params["target"] == "arm-cpu" and launcher.data.params["trials"] == "3"
    assert launcher.info.status == "RUNNING"
    assert submitted.get_status() == "SCHEDULED"  # Queued
    assert submitted.wait() is True
    assert mlflow.get_run(submitted.run_id).info.status == "FINISHED"
    assert submitted.get_status() == "FINISHED"


def test_a_failed_job_fails_the_synchronous_run(tracking_uri, monkeypatch: pytest.MonkeyPatch):
    _inject(monkeypatch, FakeMLClient(["Running", "Failed"]))
    with pytest.raises(ExecutionException, match="failed"):
        _run({"compute": "cpu-cluster"}, synchronous=True)
    [launcher] = mlflow.search_runs(output_format="list")
    assert launcher.info.status == "FAILED" and launcher.data.tags[JOB_TAG] == JOB_NAME


def test_cancel_cancels_the_job_and_kills_the_run(tracking_uri, monkeypatch: pytest.MonkeyPatch):
    fake = FakeMLClient(["Running"])
    _inject(monkeypatch, fake)
    submitted = _run({"compute": "cpu-cluster"})
    assert submitted.get_status() == "RUNNING"
    submitted.cancel()
    assert fake.jobs.cancelled == [JOB_NAME]
    assert mlflow.get_run(submitted.run_id).info.status == "KILLED"


def test_backend_config_file_sets_image_experiment_and_workspace(tracking_uri, monkeypatch: pytest.MonkeyPatch):
    fake = FakeMLClient()
    asked = _inject(monkeypatch, fake)
    config = Path(tracking_uri.removeprefix("sqlite:///")).parent / "azureml.json"
    config.write_text(json.dumps({"compute": "gpu-cluster", "image": "myacr.azurecr.io/edge:2",
                                  "experiment_name": "edge-remote", "workspace_config": "ws.json",
                                  "extras": ["test"]}))
    _run(str(config))
    assert asked == ["ws.json"]
    [(job, kwargs)] = fake.jobs.created
    assert kwargs == {"experiment_name": "edge-remote"}
    body = job._to_job()._to_rest_object().as_dict()["properties"]
    assert (body["computeId"], body["experimentName"]) == ("gpu-cluster", "edge-remote")
    assert body["environmentVariables"] == {"MLFLOW_EXPERIMENT_NAME": "edge-remote"}
    environment = job._to_job().environment
    assert environment.image == "myacr.azurecr.io/edge:2"
    pip = environment.conda_file["dependencies"][2]["pip"]
    assert pip == requirements(("test", *project_backend.extras_for(["arm-cpu"])))
    assert "pytest>=8" in pip


def test_bad_backend_config_is_one_line_before_anything_is_submitted(tracking_uri, monkeypatch):
    fake = FakeMLClient()
    _inject(monkeypatch, fake)
    with pytest.raises(EdgeError) as err:
        _run({})
    assert str(err.value) == ('the azureml backend config needs "compute": the Azure ML compute target '
                              '(e.g. {"compute": "cpu-cluster"})')
    with pytest.raises(EdgeError) as err:
        _run({"compute": "cpu-cluster", "COMPUTE": "x", "gpus": 1})
    assert str(err.value) == ("unknown azureml backend config keys: COMPUTE, gpus "
                              "(known: compute, workspace_config, image, experiment_name, extras)")
    assert fake.jobs.created == [] and mlflow.search_runs(output_format="list") == []


def test_missing_azure_configuration_is_one_line(tracking_uri, no_workspace):
    with pytest.raises(EdgeError) as err:
        _run({"compute": "cpu-cluster"})
    message = str(err.value)
    assert "\n" not in message and message.startswith("no Azure ML workspace configured: ")
    assert "config.json" in message
    assert message.endswith("AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP and AZUREML_WORKSPACE_NAME")
    assert mlflow.search_runs(output_format="list") == []
