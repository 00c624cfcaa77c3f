"""The Azure ML workspace: an ``MLClient`` from a config file or three environment variables, and job submission.

Nothing here contacts Azure until a job is submitted: ``DefaultAzureCredential`` and ``MLClient`` are lazy. Azure's
own errors (no login, a missing compute, a refused job) become one-line :class:`EdgeError`\\ s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from mlflow_edge.errors import EdgeError, first_line

ENV_VARS = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME")
CONFIG_KEYS = ("subscription_id", "resource_group", "workspace_name")
"""What a workspace's ``config.json`` (downloaded from its portal page) holds."""


@dataclasses.dataclass(frozen=True)
class SubmittedJob:
    """A job Azure ML accepted: its name (the MLflow run id in the workspace) and its page in Azure ML studio."""

    name: str
    studio_url: str


def require_azure_sdk() -> None:
    """A one-line error when ``azure-ai-ml`` or ``azure-identity`` is not installed."""
    try:
        import azure.ai.ml  # noqa: F401
        import azure.identity  # noqa: F401
    except ImportError as exc:
        raise EdgeError(f"Azure ML needs the azure extra (pip install 'mlflow-edge[azure]'): {exc}") from None


def workspace_client(config_path: str | os.PathLike | None = None) -> Any:
    """An ``MLClient`` for the workspace of ``config_path``, else of a ``config.json`` found in the current folder
    (or ``.azureml/``) or a parent, else of ``AZURE_SUBSCRIPTION_ID``, ``AZURE_RESOURCE_GROUP`` and
    ``AZUREML_WORKSPACE_NAME``; the credential is ``DefaultAzureCredential`` (``az login``, a managed identity, …)."""
    found = Path(config_path) if config_path else find_config()
    if found is not None:
        _check_config(found)
    values = [os.environ.get(name, "").strip() for name in ENV_VARS]
    if found is None and not all(values):
        unset = [name for name, value in zip(ENV_VARS, values) if not value]
        partly = f" ({', '.join(unset)} not set)" if len(unset) < len(ENV_VARS) else ""
        raise EdgeError("no Azure ML workspace configured: pass its config.json (--workspace-config; backend config "
                        "workspace_config) or put it in this folder or .azureml/, or set "
                        f"{', '.join(ENV_VARS[:-1])} and {ENV_VARS[-1]}{partly}")
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential()
    if found is not None:
        return MLClient.from_config(credential, path=str(found))
    return MLClient(credential, *values)


def find_config(start: Path | None = None) -> Path | None:
    """The first workspace config file in ``start`` (default: the current folder) or a parent: ``.azureml/config.json``
    or ``config.json`` holding the workspace keys (a model's ``config.json`` does not count)."""
    folder = (start or Path.cwd()).resolve()
    for candidate_dir in (folder, *folder.parents):
        for candidate in (candidate_dir / ".azureml" / "config.json", candidate_dir / "config.json"):
            if candidate.is_file() and not _missing_keys(candidate):
                return candidate
    return None


def _missing_keys(path: Path) -> list[str] | None:
    """The workspace keys ``path`` lacks (``None`` when it is not a JSON object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return [key for key in CONFIG_KEYS if not data.get(key)] if isinstance(data, dict) else None


def _check_config(path: Path) -> None:
    if not path.is_file():
        raise EdgeError(f"Azure ML workspace config not found: {path}")
    missing = _missing_keys(path)
    if missing is None:
        raise EdgeError(f"Azure ML workspace config {path} is not a JSON object")
    if missing:
        raise EdgeError(f"Azure ML workspace config {path} lacks {', '.join(missing)}")


def submit(job: Any, ml_client: Any, experiment_name: str | None = None) -> SubmittedJob:
    """Submit ``job`` (a pipeline or command job) to the workspace of ``ml_client`` under ``experiment_name``
    (default: the job's own)."""
    from azure.core.exceptions import AzureError  # azure-ai-ml's own MlException is one

    try:
        created = ml_client.jobs.create_or_update(job, experiment_name=experiment_name or job.experiment_name)
    except AzureError as exc:
        raise EdgeError(f"Azure ML did not accept the job: {first_line(exc)}") from exc
    return SubmittedJob(created.name, created.studio_url or "")
