"""The workspace client: a config file (given or found) or three environment variables, without contacting Azure;
anything missing is one line naming what to configure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from azure.ai.ml import MLClient

from mlflow_edge.azureml.workspace import find_config, workspace_client
from mlflow_edge.errors import EdgeError

WORKSPACE = {"subscription_id": "sub-1", "resource_group": "rg-1", "workspace_name": "ws-1"}


def _names(client: MLClient) -> tuple[str, str, str]:
    return client.subscription_id, client.resource_group_name, client.workspace_name


def test_from_the_three_variables(no_workspace: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "sub-2")
    monkeypatch.setenv("AZURE_RESOURCE_GROUP", "rg-2")
    monkeypatch.setenv("AZUREML_WORKSPACE_NAME", "ws-2")
    assert _names(workspace_client()) == ("sub-2", "rg-2", "ws-2")


def test_a_config_file_found_above_or_given_wins(no_workspace: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "sub-2")
    (no_workspace.parent / ".azureml").mkdir()
    (no_workspace.parent / ".azureml" / "config.json").write_text(json.dumps(WORKSPACE))
    (no_workspace / "config.json").write_text(json.dumps({"model_type": "llama"}))  # a model's config: not one
    assert find_config() == no_workspace.parent / ".azureml" / "config.json"
    assert _names(workspace_client()) == ("sub-1", "rg-1", "ws-1")
    given = no_workspace / "team.json"
    given.write_text(json.dumps({**WORKSPACE, "workspace_name": "ws-3"}))
    assert _names(workspace_client(given)) == ("sub-1", "rg-1", "ws-3")


def test_missing_configuration_is_one_line(no_workspace: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "sub-2")
    with pytest.raises(EdgeError) as err:
        workspace_client()
    assert str(err.value).endswith("or set AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP and AZUREML_WORKSPACE_NAME "
                                   "(AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME not set)")
    with pytest.raises(EdgeError, match=r"^Azure ML workspace config not found: missing\.json$"):
        workspace_client("missing.json")
    (no_workspace / "partial.json").write_text(json.dumps({"subscription_id": "s"}))
    with pytest.raises(EdgeError, match=r"^Azure ML workspace config partial\.json lacks resource_group, "
                                        r"workspace_name$"):
        workspace_client("partial.json")
