"""Helpers of the server tests: a sqlite store with registered tiny models, and a real ``mlflow-edge serve`` process
on a loopback port."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_edge import flavors
from mlflow_edge.backends.base import Artifact
from tests.server_process import LOOPBACK, ServerProcess, free_port


class Store:
    """A sqlite MLflow store in ``root`` where tiny models are logged, registered and aliased."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"

    def register(self, artifact: Artifact, name: str, alias: str | None = None, **kwargs: Any) -> str:
        """Log ``artifact`` in a new run, register it as a version of ``name`` (and point ``alias`` at it). Uses a
        client and an explicit run, so no active experiment or run leaks into other tests."""
        client = self.client()
        experiment = client.get_experiment_by_name("served-models")
        previous, previous_registry, cwd = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.getcwd()
        os.chdir(self.root)  # the default artifact root is ./mlruns
        try:
            experiment_id = experiment.experiment_id if experiment else client.create_experiment("served-models")
            run_id = client.create_run(experiment_id).info.run_id
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)  # another test may have pointed the registry at its own store
            info = flavors.log_artifact_model(artifact, name="model", run_id=run_id, **kwargs)
            client.set_terminated(run_id)
            version = str(mlflow.register_model(info.model_uri, name).version)
            if alias:
                client.set_registered_model_alias(name, alias, version)
        finally:
            os.chdir(cwd)
            mlflow.set_tracking_uri(previous)
            mlflow.set_registry_uri(previous_registry)
        return version

    def env(self) -> dict[str, str]:
        """This process's environment with this store as tracking and registry store (``set_tracking_uri`` and
        ``set_registry_uri`` export both, so another test's may linger)."""
        return {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "MLFLOW_REGISTRY_URI": self.uri,
                "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK}

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


class EdgeServer(ServerProcess):
    """``mlflow-edge serve <model_uri>`` on a free loopback port, in its own session."""

    def __init__(self, store: Store, model_uri: str, log_file: Path, *args: str) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "mlflow_edge.cli", "serve", model_uri, "--host", LOOPBACK, "--port", str(port),
               *args]
        super().__init__(cmd, log_file, store.env(), cwd=store.root, port=port)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/health", timeout=10).json()

    def wait_for_version(self, version: str, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (health := self.health())["version"] != version:
            if time.monotonic() > deadline:
                pytest.fail(f"still serving {health} after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)
        return health

    def post(self, route: str, body: Any, raw: bytes | None = None) -> httpx.Response:
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(f"{self.base}{route}", content=content, headers={"Content-Type": "application/json"},
                          timeout=120)

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=10).text

    def hangup(self) -> None:
        os.kill(self.process.pid, signal.SIGHUP)


@pytest.fixture()
def edge_server(tmp_path: Path) -> Iterator[Any]:
    """``edge_server(store, model_uri, *args)``: a started, ready server; stopped after the test."""
    servers: list[EdgeServer] = []

    def start(store: Store, model_uri: str, *args: str) -> EdgeServer:
        server = EdgeServer(store, model_uri, tmp_path / f"serve-{len(servers)}.log", *args)
        servers.append(server)
        return server.wait_ready()

    yield start
    for server in servers:
        server.stop()
