"""Backends by name. A new framework adds one module and one line here."""

from __future__ import annotations

import importlib

from mlflow_edge.backends.base import Artifact, Backend, EdgeError, Generation, OptionSpec, Runner

BACKENDS: dict[str, str] = {
    "llamacpp": "mlflow_edge.backends.llamacpp:LlamaCppBackend",
    "openvino": "mlflow_edge.backends.openvino:OpenVINOBackend",
}

__all__ = ["Artifact", "Backend", "BACKENDS", "EdgeError", "Generation", "OptionSpec", "Runner", "get_backend"]


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``."""
    try:
        module_name, class_name = BACKENDS[name].split(":")
    except KeyError:
        raise EdgeError(f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})") from None
    return getattr(importlib.import_module(module_name), class_name)()
