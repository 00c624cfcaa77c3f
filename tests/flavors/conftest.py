"""Helpers of the flavor tests: a module-wide sqlite store with one logged model, and a real ``mlflow models serve``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pytest

from mlflow_edge import flavors
from mlflow_edge.backends.base import Artifact
from tests.server_process import ServerProcess, free_port


@dataclasses.dataclass(frozen=True)
class Logged:
    tracking_uri: str
    model_uri: str
    pyfunc_model: mlflow.pyfunc.PyFuncModel


def _log_in_new_store(root: Path, artifact: Artifact, **kwargs: Any) -> Logged:
    """``artifact`` logged with :func:`flavors.log_artifact_model` in a run of a new sqlite store in ``root``."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous, cwd = mlflow.get_tracking_uri(), os.getcwd()
    os.chdir(root)  # the default artifact root is ./mlruns
    try:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(experiment_id="0"):  # not the experiment an earlier test made active in its store
            info = flavors.log_artifact_model(artifact, name="model", **kwargs)
        model = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(previous)
    return Logged(uri, info.model_uri, model)


@pytest.fixture(scope="session")
def log_in_new_store():
    """``log_in_new_store(root, artifact, **kwargs)`` (for module-scoped fixtures): a :class:`Logged` model."""
    return _log_in_new_store


@pytest.fixture()
def use_store(monkeypatch: pytest.MonkeyPatch):
    """``use_store(logged)``: the store of ``logged`` as the current tracking URI for one test."""
    previous = mlflow.get_tracking_uri()

    def use(logged: Logged) -> Logged:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
        mlflow.set_tracking_uri(logged.tracking_uri)
        return logged

    yield use
    mlflow.set_tracking_uri(previous)


class Server(ServerProcess):
    """``mlflow models serve -m <model_uri> --env-manager local`` on a free loopback port, in its own session."""

    ready_path = "/ping"

    def __init__(self, logged: Logged, log_file: Path) -> None:
        port = free_port()
        loopback = "127.0.0.1,localhost"
        env = {**os.environ, "MLFLOW_TRACKING_URI": logged.tracking_uri, "NO_PROXY": loopback, "no_proxy": loopback}
        # the server runs `uvicorn` through bash, found on PATH: put this interpreter's bin folder first
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged.model_uri, "--env-manager", "local",
               "-p", str(port), "--host", "127.0.0.1"]
        super().__init__(cmd, log_file, env, port=port)

    def invoke(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST ``body`` to ``/invocations``: the HTTP status and the JSON answer (errors included)."""
        request = urllib.request.Request(f"{self.base}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Any]:
    """``serve(*logged)``: one started server per logged model, all ready; stopped after the test."""
    servers: list[Server] = []

    def start(*models: Logged) -> list[Server]:
        started = [Server(logged, tmp_path / f"serve-{len(servers) + i}.log") for i, logged in enumerate(models)]
        servers.extend(started)
        for server in started:  # started together, so their start-ups overlap
            server.wait_ready()
        return started

    yield start
    for server in servers:
        server.stop()
