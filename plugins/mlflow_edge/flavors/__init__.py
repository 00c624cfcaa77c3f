"""MLflow flavors by artifact format. A new format adds one module and one line here.

Each flavor module offers ``log_model(model_file, name=..., metadata_config=...)`` and ``FLAVOR_NAME``; the
``metadata_config`` written here is the :class:`~mlflow_edge.backends.base.Artifact` itself, so a logged model can be
turned back into an artifact for evaluation (:func:`artifact_from_model`).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from mlflow.models import Model
from mlflow.models.model import ModelInfo

from mlflow_edge.backends.base import Artifact, EdgeError

@dataclasses.dataclass(frozen=True)
class FlavorEntry:
    """Where an artifact format's MLflow flavor lives: its module, flavor name, and the flavor-config key naming the
    model file (or folder; a folder's config lists its model files, those whose bytes count, under ``model_files``)."""

    module: str
    name: str
    model_key: str


FLAVORS: dict[str, FlavorEntry] = {
    "gguf": FlavorEntry("mlflow_edge.flavors.gguf", "gguf", "gguf_file"),
    "openvino_ir": FlavorEntry("mlflow_edge.flavors.openvino", "openvino", "model_dir"),
}
"""Artifact format (the conventions' ``format`` param) → its flavor."""


def flavor_module(artifact_format: str) -> ModuleType:
    try:
        return importlib.import_module(FLAVORS[artifact_format].module)
    except KeyError:
        raise EdgeError(f"no MLflow flavor for format '{artifact_format}' (known: {', '.join(FLAVORS)})") from None


def artifact_metadata(artifact: Artifact) -> dict[str, Any]:
    return {
        "backend": artifact.backend,
        "format": artifact.format,
        "precision": artifact.precision,
        "source_name": artifact.source_name,
        "source_sha256": artifact.source_sha256,
        "num_parameters": artifact.num_parameters,
        "options": {k: v for k, v in artifact.options.items()},
    }


def log_artifact_model(artifact: Artifact, name: str = "model", **kwargs: Any) -> ModelInfo:
    """Log ``artifact`` as an MLflow model of its format's flavor in the active run."""
    module = flavor_module(artifact.format)
    return module.log_model(artifact.path, name=name, metadata_config=artifact_metadata(artifact), **kwargs)


def artifact_from_model(model_uri: str, dst_path: str | None = None) -> Artifact:
    """Download a model logged by mlflow-edge and describe it as an :class:`Artifact`."""
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    try:
        local = Path(_download_artifact_from_uri(model_uri, output_path=dst_path))
        model = Model.load(str(local))
    except Exception as exc:
        raise EdgeError(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from exc
    for artifact_format, entry in FLAVORS.items():
        conf = model.flavors.get(entry.name)
        if conf is None:
            continue
        path = local / conf[entry.model_key]
        return Artifact(
            path=path,
            backend=conf.get("backend", "llamacpp" if entry.name == "gguf" else entry.name),
            format=artifact_format,
            precision=str(conf.get("precision", "unknown")),
            source_name=str(conf.get("source_name", "unknown")),
            source_sha256=str(conf.get("source_sha256", "")),
            num_parameters=int(conf.get("num_parameters", 0)),
            options=dict(conf.get("options") or {}),
            files=tuple(path / name for name in conf["model_files"]) if conf.get("model_files") else (path,),
        )
    raise EdgeError(f"{model_uri} is not a model of an mlflow-edge flavor "
                    f"({', '.join(e.name for e in FLAVORS.values())})")
