"""``mlflow-edge azureml pipeline``: the YAML azure-ai-ml loads back offline, its steps, commands, order and
environment, and submission to a fake MLClient."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import yaml
from azure.ai.ml import load_job
from azure.ai.ml.entities import PipelineJob
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mlflow_edge.azureml import pipeline as azure_pipeline
from mlflow_edge.azureml.cli import azureml
from mlflow_edge.azureml.environment import DISTRIBUTION, extras_for
from mlflow_edge.errors import EdgeError

from .conftest import JOB_NAME, STUDIO_URL, FakeMLClient

INSTALL = "pip install --no-deps . && "
CONVERT = ("mlflow-edge convert --model ${{inputs.model}} --target ${{inputs.target}} "
           "> ${{outputs.converted}}/model_uri.txt && cat ${{outputs.converted}}/model_uri.txt")
SEARCH = ("cat ${{inputs.converted}}/model_uri.txt && mlflow-edge search --model ${{inputs.model}} "
          "--target ${{inputs.target}} --trials ${{inputs.trials}} --registered-model ${{inputs.registered_model}} "
          "$[[--storage ${{inputs.storage}}]] > ${{outputs.summary}}/search.txt && cat ${{outputs.summary}}/search.txt")
PROMOTE = ("mlflow-edge promote --experiment ${{inputs.experiment}} --target ${{inputs.target}} "
           "--registered-model ${{inputs.registered_model}}")
STORAGE = "postgresql://optuna@db.example/optuna"


def _invoke(*args: str):
    return CliRunner().invoke(azureml, ["pipeline", *args])


@pytest.fixture()
def written(tmp_path: Path) -> Path:
    out = tmp_path / "out" / "pipeline.yml"
    result = _invoke("--dry-run", "--targets", "cpu,arm-cpu", "--trials", "3", "--storage", STORAGE,
                     "--compute", "edge-cluster", "--experiment", "edge-exp", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.output == f"pipeline: {out}\n"
    return out


def test_dry_run_yaml_loads_back_with_one_search_per_target(written: Path):
    job = load_job(written)  # azure-ai-ml's own loader and schema, offline
    assert isinstance(job, PipelineJob)
    assert sorted(job.jobs) == ["convert", "promote_arm_cpu", "promote_cpu", "search_arm_cpu", "search_cpu"]
    assert job.experiment_name == "edge-exp"
    assert job.settings.default_compute == "edge-cluster"
    assert job.jobs["convert"].component.command == INSTALL + CONVERT
    for target in ("cpu", "arm-cpu"):
        step = target.replace("-", "_")
        assert job.jobs[f"search_{step}"].component.command == INSTALL + SEARCH
        assert job.jobs[f"promote_{step}"].component.command == INSTALL + PROMOTE
    raw = yaml.safe_load(written.read_text())
    assert raw["inputs"] == {"model": "demo", "trials": 3, "registered_model": "SmolLM2-135M-Instruct-edge",
                             "experiment": "edge-exp"}
    assert raw["jobs"]["search_arm_cpu"]["inputs"]["target"] == "arm-cpu"
    assert raw["jobs"]["search_cpu"]["inputs"]["storage"] == STORAGE
    assert raw["jobs"]["promote_cpu"]["inputs"]["target"] == "cpu"
    assert raw["jobs"]["convert"]["inputs"]["target"] == "cpu"


def test_searches_follow_convert_and_every_promote_follows_every_search(written: Path):
    jobs = yaml.safe_load(written.read_text())["jobs"]
    for step in ("cpu", "arm_cpu"):
        assert jobs[f"search_{step}"]["inputs"]["converted"] == {"path": "${{parent.jobs.convert.outputs.converted}}"}
        assert jobs[f"search_{step}"]["inputs"]["model"] == {"path": "${{parent.inputs.model}}"}
    for step in ("cpu", "arm_cpu"):
        summaries = {k: v for k, v in jobs[f"promote_{step}"]["inputs"].items() if k.startswith("summary_")}
        assert summaries == {"summary_cpu": {"path": "${{parent.jobs.search_cpu.outputs.summary}}"},
                             "summary_arm_cpu": {"path": "${{parent.jobs.search_arm_cpu.outputs.summary}}"}}


def test_environment_installs_the_distributions_requirements_for_the_targets(written: Path):
    environment = load_job(written).jobs["search_cpu"].environment
    assert environment.image == "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04"
    python, pip, pip_section = environment.conda_file["dependencies"]
    assert (python, pip) == ("python=3.11", "pip")
    listed = {canonicalize_name(Requirement(line).name): Requirement(line) for line in pip_section["pip"]}
    assert len(listed) == len(pip_section["pip"])  # one line per package
    extras = extras_for(["cpu", "arm-cpu"])
    assert extras  # the targets recommend registered backends that are extras of the distribution
    expected: set[str] = set()
    for line in importlib.metadata.requires(DISTRIBUTION):
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            expected.add(canonicalize_name(req.name))
            assert set(req.specifier) <= set(listed[canonicalize_name(req.name)].specifier), line
    assert set(listed) == expected
    assert "mlflow" in listed and "pytest" not in listed  # the base, never the test extra


def test_image_and_unknown_target_and_registered_model(tmp_path: Path):
    out = tmp_path / "p.yml"
    assert _invoke("--dry-run", "--image", "myacr.azurecr.io/edge:1", "--out", str(out)).exit_code == 0
    assert load_job(out).jobs["convert"].environment.image == "myacr.azurecr.io/edge:1"
    assert "storage" not in yaml.safe_load(out.read_text())["jobs"]["search_cpu"]["inputs"]  # no --storage
    out.unlink()
    assert _invoke("--dry-run", "--extras", "test", "--out", str(out)).exit_code == 0
    assert "pytest>=8" in load_job(out).jobs["search_cpu"].environment.conda_file["dependencies"][2]["pip"]

    bad = tmp_path / "bad.yml"
    result = _invoke("--dry-run", "--targets", "cpu,moon", "--out", str(bad))
    assert result.exit_code == 1
    assert result.output.startswith("mlflow-edge: error: unknown target 'moon' (choose from ")
    assert result.output.count("\n") == 1
    assert not bad.exists()
    result = _invoke("--dry-run", "--extras", "test,bogus", "--out", str(bad))
    assert result.exit_code == 1
    assert result.output.startswith("mlflow-edge: error: mlflow-edge has no extra bogus (it offers ")
    assert not bad.exists()
    result = _invoke("--dry-run", "--model", "org/other-model", "--out", str(bad))
    assert result.output == ("mlflow-edge: error: --registered-model is required for a model other than demo "
                             "(search and promote share it)\n")
    assert not bad.exists()


def test_without_a_workspace_submission_is_one_line_naming_what_to_configure(no_workspace: Path):
    result = _invoke("--out", "p.yml")
    assert result.exit_code == 1
    assert result.output == ("mlflow-edge: error: no Azure ML workspace configured: pass its config.json "
                             "(--workspace-config; backend config workspace_config) or put it in this folder or "
                             ".azureml/, or set AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP and "
                             "AZUREML_WORKSPACE_NAME\n")
    assert not (no_workspace / "p.yml").exists()  # refused before anything is written


def test_submission_sends_the_written_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakeMLClient()
    asked: list[str | None] = []
    monkeypatch.setattr(azure_pipeline, "workspace_client", lambda path=None: asked.append(path) or fake)
    out = tmp_path / "p.yml"
    result = _invoke("--targets", "intel-cpu", "--trials", "2", "--workspace-config", "ws.json", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.output == f"pipeline: {out}\nsubmitted: {JOB_NAME} {STUDIO_URL}\n"
    assert asked == ["ws.json"]
    [(job, kwargs)] = fake.jobs.created
    assert kwargs == {"experiment_name": "mlflow-edge"}
    payload = job._to_dict()  # what azure-ai-ml serializes before it uploads the code and registers the environment
    assert payload == yaml.safe_load(out.read_text())
    assert sorted(payload["jobs"]) == ["convert", "promote_intel_cpu", "search_intel_cpu"]
    assert payload["settings"] == {"default_compute": "azureml:cpu-cluster"}
    assert payload["jobs"]["search_intel_cpu"]["inputs"]["target"] == "intel-cpu"
    assert payload["jobs"]["search_intel_cpu"]["component"]["command"] == INSTALL + SEARCH
    assert payload["jobs"]["search_intel_cpu"]["component"]["code"] == str(Path(azure_pipeline.__file__).parents[3])
    assert payload["inputs"]["trials"] == 2


def test_steps_track_into_the_given_server_instead_of_azures_run(tmp_path):
    from mlflow_edge.azureml.pipeline import build_pipeline

    job = build_pipeline(targets=["cpu"], code=str(tmp_path), tracking_uri="http://mlflow.internal:5000")
    commands = {name: node.command for name, node in job.jobs.items()}
    prefix = ("env -u MLFLOW_RUN_ID MLFLOW_TRACKING_URI=http://mlflow.internal:5000 "
              "MLFLOW_REGISTRY_URI=http://mlflow.internal:5000 mlflow-edge ")
    assert all(prefix + step in commands[name] for name, step in
               (("convert", "convert"), ("search_cpu", "search"), ("promote_cpu", "promote")))
    with pytest.raises(EdgeError, match="--tracking-uri must be a tracking server"):
        build_pipeline(targets=["cpu"], code=str(tmp_path), tracking_uri="file:///tmp/mlruns")
