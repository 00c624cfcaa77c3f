"""An MLflow project backend (entry-point group ``mlflow.project_backend``, name ``azureml``):
``mlflow run . -e search -b azureml --backend-config cfg.json`` submits the entry point as an Azure ML command job.

The backend config (a dict, or a ``.json`` file): ``compute`` (required), ``workspace_config`` (a workspace
``config.json``; default: one found here, else the environment variables of :func:`.workspace.workspace_client`),
``image`` (base image), ``experiment_name`` (default: the MLflow experiment's name) and ``extras`` (more extras of
mlflow-edge for the job's environment: a list or a comma-separated string).

The job uploads the project folder, installs it when it is a Python project, and runs the entry point's command with
the parameters substituted, as ``mlflow run`` would locally, in an environment from mlflow-edge's requirements plus
the extras of the backends the run's ``target`` (and ``backend``/``backends``) parameters name. ``mlflow run`` tags
the run it reports in the caller's tracking store, where Azure's run ids do not exist, so that run is a launcher run:
the project, entry point, parameters and commit like a local run, the Azure job's name and studio page as tags, ending
with the job's outcome once waited on. What the entry point logs goes to the job's own run in the workspace.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import RunStatus
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun
from mlflow.projects.utils import (
    PROJECT_BUILD_IMAGE,
    PROJECT_DOCKER_ARGS,
    PROJECT_DOCKER_AUTH,
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    PROJECT_SYNCHRONOUS,
    fetch_and_validate_project,
    get_entry_point_command,
    get_or_create_run,
    load_project,
)
from mlflow.tracking import MlflowClient

from mlflow_edge.azureml.environment import (
    DEFAULT_IMAGE,
    INSTALL_SOURCE,
    extras_for,
    is_installable,
    job_environment,
)
from mlflow_edge.azureml.workspace import require_azure_sdk, submit, workspace_client
from mlflow_edge.errors import EdgeError, first_line

CONFIG_KEYS = ("compute", "workspace_config", "image", "experiment_name", "extras")
_MLFLOW_KEYS = frozenset({PROJECT_ENV_MANAGER, PROJECT_SYNCHRONOUS, PROJECT_DOCKER_ARGS, PROJECT_STORAGE_DIR,
                          PROJECT_BUILD_IMAGE, PROJECT_DOCKER_AUTH})
"""Keys ``mlflow.projects.run`` adds to every backend config itself."""

JOB_TAG = "mlflow_edge.azureml_job"
STUDIO_TAG = "mlflow_edge.azureml_studio_url"

# Azure ML job states (azure-ai-ml's JobStatus) -> MLflow run states; the first five are Azure's terminal ones.
RUN_STATUS: dict[str, str] = {
    "Completed": "FINISHED", "Failed": "FAILED", "NotResponding": "FAILED", "Canceled": "KILLED", "Paused": "KILLED",
    "NotStarted": "SCHEDULED", "Queued": "SCHEDULED", "Preparing": "SCHEDULED", "Provisioning": "SCHEDULED",
    "Starting": "SCHEDULED", "Running": "RUNNING", "Finalizing": "RUNNING", "CancelRequested": "RUNNING",
}
TERMINAL = frozenset({"Completed", "Failed", "NotResponding", "Canceled", "Paused"})


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """The ``azureml`` backend config: where the job runs, which workspace, on what image, in which experiment."""

    compute: str
    workspace_config: str | None = None
    image: str = DEFAULT_IMAGE
    experiment_name: str | None = None
    extras: str = ""


def parse_backend_config(config: Mapping[str, Any] | None) -> BackendConfig:
    """The backend config, checked: unknown keys and a missing ``compute`` are one-line errors."""
    given = {k: v for k, v in (config or {}).items() if k not in _MLFLOW_KEYS}
    unknown = sorted(set(given) - set(CONFIG_KEYS))
    if unknown:
        raise EdgeError(f"unknown azureml backend config keys: {', '.join(unknown)} "
                        f"(known: {', '.join(CONFIG_KEYS)})")
    if not str(given.get("compute") or "").strip():
        raise EdgeError('the azureml backend config needs "compute": the Azure ML compute target '
                        '(e.g. {"compute": "cpu-cluster"})')
    if isinstance(given.get("extras"), (list, tuple)):
        given["extras"] = ",".join(map(str, given["extras"]))
    return BackendConfig(**{k: str(v) for k, v in given.items() if v is not None and str(v).strip()})


class AzureMLBackend(AbstractBackend):
    """Runs an MLflow project entry point as an Azure ML command job."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri, experiment_id):
        config = parse_backend_config(backend_config)
        require_azure_sdk()
        ml_client = workspace_client(config.workspace_config)
        params = dict(params or {})
        work_dir = fetch_and_validate_project(project_uri, version, entry_point, params)
        project = load_project(work_dir)
        commands = get_entry_point_command(project, entry_point, params, (backend_config or {}).get(
            PROJECT_STORAGE_DIR))
        experiment = config.experiment_name or MlflowClient(tracking_uri).get_experiment(experiment_id).name
        job = command_job(work_dir, " && ".join(commands), config, experiment,
                          extras_for(*_targets_and_backends(project.get_entry_point(entry_point), params),
                                     requested=config.extras.split(",")),
                          f"{project.name or 'project'} {entry_point}")
        submitted = submit(job, ml_client, experiment)
        run = get_or_create_run(None, project_uri, experiment_id, work_dir, version, entry_point, params)
        client = MlflowClient(tracking_uri)
        client.set_tag(run.info.run_id, JOB_TAG, submitted.name)
        client.set_tag(run.info.run_id, STUDIO_TAG, submitted.studio_url)
        return AzureMLSubmittedRun(run.info.run_id, submitted.name, ml_client, tracking_uri)


def command_job(work_dir: str, entry_command: str, config: BackendConfig, experiment: str,
                extras: tuple[str, ...], display_name: str) -> Any:
    """The Azure ML command job: the project folder as code, installed first when pip can install it."""
    from azure.ai.ml import command

    run = f"{INSTALL_SOURCE} && {entry_command}" if is_installable(Path(work_dir)) else entry_command
    return command(code=work_dir, command=run, environment=job_environment(extras, config.image),
                   compute=config.compute, experiment_name=experiment, display_name=display_name,
                   environment_variables={"MLFLOW_EXPERIMENT_NAME": experiment})


def _targets_and_backends(entry: Any, params: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ``target`` (default ``cpu``) and ``backend``/``backends`` values the run uses, given or defaults."""
    def value(name: str) -> str:
        given = params.get(name)
        default = entry.parameters[name].default if name in entry.parameters else None
        return str(given if given is not None else default or "")

    backends = [b.strip() for b in f"{value('backends')},{value('backend')}".split(",") if b.strip()]
    return (value("target") or "cpu",), tuple(backends)


class AzureMLSubmittedRun(SubmittedRun):
    """The launcher run of a submitted Azure ML job: ``wait`` polls the job, then ends the launcher run with the job's
    outcome (also when called directly after ``synchronous=False``); ``cancel`` cancels the job."""

    poll_seconds: float = 30.0

    def __init__(self, run_id: str, job_name: str, ml_client: Any, tracking_uri: str | None = None) -> None:
        super().__init__()
        self._run_id = run_id
        self.job_name = job_name
        self._ml_client = ml_client
        self._tracking_uri = tracking_uri

    @property
    def run_id(self) -> str:
        return self._run_id

    def wait(self) -> bool:
        while (status := self.azure_status()) not in TERMINAL:
            time.sleep(self.poll_seconds)
        self._end(RUN_STATUS[status])
        return status == "Completed"

    def get_status(self) -> str:
        return RUN_STATUS.get(self.azure_status(), "RUNNING")

    def cancel(self) -> None:
        self._ml_client.jobs.begin_cancel(self.job_name).result()
        self._end("KILLED")

    def azure_status(self) -> str:
        """The job's Azure ML state (``Running``, ``Completed``, …)."""
        from azure.core.exceptions import AzureError

        try:
            return str(self._ml_client.jobs.get(self.job_name).status)
        except AzureError as exc:
            raise EdgeError(f"cannot read Azure ML job {self.job_name}: {first_line(exc)}") from exc

    def _end(self, status: str) -> None:
        client = MlflowClient(self._tracking_uri)
        if not RunStatus.is_terminated(client.get_run(self._run_id).info.status):
            client.set_terminated(self._run_id, status)
