"""MLflow flavors by artifact format: each backend names its flavor module (``Backend.flavor``), so a new format adds
its module and nothing here.

A flavor module offers ``FLAVOR_NAME``, ``save_model``, ``log_model(model_path, name=..., **kwargs)``, ``load_model``
and ``load_generator`` (the text generator of a saved model, which mlflow-edge's server runs; MLflow's pyfunc hook
``_load_pyfunc`` is the same function); the skeleton they share and their one request contract live in
:mod:`mlflow_edge.flavors._common`; every private MLflow name they need, in
:mod:`mlflow_edge.flavors._mlflow_compat`. The provenance of a logged artifact (backend, format, precision, source,
options) is the model's ``Model.metadata["mlflow_edge"]``; the model file or folder is its flavor config's ``data``
(a folder's config lists the files whose bytes count as its size under ``model_files``). :func:`artifact_from_model`
reads both back, so a logged model can be evaluated like the artifact it came from.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from mlflow.models import Model
from mlflow.models.model import ModelInfo

from mlflow_edge import cache
from mlflow_edge.backends import backend_for_format
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError, first_line
from mlflow_edge.tags import METADATA_KEY


def flavor_module(artifact_format: str) -> ModuleType:
    """The flavor module of ``artifact_format`` (the conventions' ``format`` param), from the backend writing it."""
    return importlib.import_module(backend_for_format(artifact_format).flavor)


def provenance(artifact: Artifact) -> dict[str, Any]:
    """What a logged model records about the artifact it holds (its ``Model.metadata["mlflow_edge"]``), with the
    framework's own server commands for it (``Backend.native_serve_commands``), so that a promotion's readiness
    report lists them without importing the backend."""
    return {
        "backend": artifact.backend,
        "format": artifact.format,
        "precision": artifact.precision,
        "source_name": artifact.source_name,
        "source_sha256": artifact.source_sha256,
        "num_parameters": artifact.num_parameters,
        "options": dict(artifact.options),
        "native_serve_commands": list(backend_for_format(artifact.format).native_serve_commands),
    }


def log_artifact_model(artifact: Artifact, name: str = "model", **kwargs: Any) -> ModelInfo:
    """Log ``artifact`` as an MLflow model of its format's flavor in the active run, its provenance in
    ``Model.metadata`` and the recipe it was made with (if any) under the run's ``recipe/``; ``kwargs`` go to the
    flavor's ``log_model`` (``metadata`` is merged)."""
    import mlflow

    from mlflow_edge.recipes import side_files

    metadata = {**(kwargs.pop("metadata", None) or {}), METADATA_KEY: provenance(artifact)}
    info = flavor_module(artifact.format).log_model(artifact.path, name=name, metadata=metadata, **kwargs)
    for file in side_files(artifact.path):  # a recipe and its sensitivity table: readable, editable, re-applicable
        mlflow.log_artifact(str(file), artifact_path="recipe")
    return info


def artifact_from_model(model_uri: str, dst_path: str | None = None) -> Artifact:
    """Download a model logged by mlflow-edge (into ``dst_path``) and describe it as an :class:`Artifact`."""
    import mlflow.artifacts

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
        model = Model.load(str(local))
    except Exception as exc:
        raise EdgeError(f"cannot load model {model_uri}: {first_line(exc)}") from exc
    info = (model.metadata or {}).get(METADATA_KEY)
    if not isinstance(info, dict) or not {"backend", "format"} <= set(info):
        raise EdgeError(f"{model_uri} is not a model logged by mlflow-edge "
                        f"(no backend and format in its metadata['{METADATA_KEY}'])")
    flavor_name = flavor_module(info["format"]).FLAVOR_NAME
    conf = model.flavors.get(flavor_name)
    if conf is None:
        raise EdgeError(f"{model_uri} has no '{flavor_name}' flavor for its format '{info['format']}'")
    what = f"the MLmodel file of {model_uri}"
    path = cache.inside(local, conf["data"], what)
    files = tuple(cache.inside(path, name, what) for name in conf.get("model_files") or ())
    return Artifact(
        path=path,
        backend=str(info["backend"]),
        format=str(info["format"]),
        precision=str(info.get("precision", "unknown")),
        source_name=str(info.get("source_name", "unknown")),
        source_sha256=str(info.get("source_sha256", "")),
        num_parameters=int(info.get("num_parameters", 0)),
        options=dict(info.get("options") or {}),
        files=files or (path,),
    )
