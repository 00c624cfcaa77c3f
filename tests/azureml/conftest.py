"""A fake at the MLClient edge only: ``jobs.create_or_update`` captures the job azure-ai-ml would send, ``jobs.get``
reports states from a script, ``jobs.begin_cancel`` records the cancelled job. No test contacts Azure."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from mlflow_edge.azureml.workspace import ENV_VARS

JOB_NAME = "edge-job-1"
STUDIO_URL = f"https://ml.azure.com/runs/{JOB_NAME}"


class FakeJobs:
    def __init__(self, statuses: list[str]) -> None:
        self.created: list[tuple[object, dict]] = []
        self.statuses = list(statuses)
        self.cancelled: list[str] = []

    def create_or_update(self, job, **kwargs):
        self.created.append((job, kwargs))
        return types.SimpleNamespace(name=JOB_NAME, studio_url=STUDIO_URL, status="Starting")

    def get(self, name: str):
        assert name == JOB_NAME
        return types.SimpleNamespace(name=name, status=self.statuses.pop(0) if len(self.statuses) > 1
                                     else self.statuses[0])

    def begin_cancel(self, name: str):
        self.cancelled.append(name)
        return types.SimpleNamespace(result=lambda: None)


class FakeMLClient:
    def __init__(self, statuses: list[str] | None = None) -> None:
        self.jobs = FakeJobs(statuses or ["Running", "Completed"])


@pytest.fixture()
def no_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Azure configuration: none of the three variables, and a current folder without a workspace config."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder
