"""Conversions and quantizations through the content-addressed cache: nothing is converted twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflow_edge import cache
from mlflow_edge.backends import get_backend
from mlflow_edge.backends.base import Artifact
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import TextSlice
from mlflow_edge.sources import SourceModel


def _cached_artifact(kind: str, key: Mapping[str, Any], build: Callable[[Path], Artifact]) -> Artifact:
    def build_into(tmp: Path) -> None:
        artifact = build(tmp)
        data = json.loads(artifact.to_json())
        data["path"] = str(Path(data["path"]).relative_to(tmp))
        data["files"] = [str(Path(f).relative_to(tmp)) for f in data["files"]]
        (tmp / "artifact.json").write_text(json.dumps(data, sort_keys=True))

    folder = cache.get_or_build(kind, key, build_into)
    return read_artifact_record(folder)


def read_artifact_record(folder: Path) -> Artifact:
    """The :class:`Artifact` that ``folder/artifact.json`` records; its paths must stay inside ``folder``."""
    record = folder / "artifact.json"
    data = json.loads(record.read_text())
    data["path"] = str(cache.inside(folder, data["path"], str(record)))
    data["files"] = [str(cache.inside(folder, f, str(record))) for f in data["files"]]
    return Artifact.from_json(json.dumps(data))


def convert(source: SourceModel, backend: str, precision: str | None = None) -> Artifact:
    """``source`` in ``backend``'s format at ``precision`` (default: the backend's ``base_precision``), cached by source
    hash and name (a converter may write the name into the file: llama.cpp's ``general.name``), precision and
    framework version."""
    impl = get_backend(backend)
    precision = precision or impl.base_precision
    reason = impl.unsupported_reason(source)
    if reason:
        raise EdgeError(f"unsupported architecture: {reason}")
    key = {"source": source.sha256, "name": source.name, "backend": backend, "format": impl.format,
           "precision": precision.lower(), "versions": impl.versions()}  # the name: converters write it in the file
    return _cached_artifact(f"convert-{backend}", key, lambda tmp: impl.convert(source, tmp, precision))


def quantize(source: SourceModel, base: Artifact, precision: str, options: Mapping[str, Any] | None = None,
             calibration: TextSlice | None = None) -> Artifact:
    """``base`` quantized to ``precision`` with ``options`` (cached by all of those, the calibration text, and the
    content of a ``recipe`` file option: an edited recipe is a new artifact)."""
    impl = get_backend(base.backend)
    options = dict(options or {})
    key = {"source": source.sha256, "name": source.name, "base": base.precision, "backend": base.backend,
           "format": impl.format,
           "precision": precision.upper(),
           "options": options, "calibration": calibration.sha256 if calibration else None,
           "recipe": _file_sha256(options.get("recipe")),
           "versions": impl.versions()}
    return _cached_artifact(
        f"quantize-{base.backend}", key,
        lambda tmp: impl.quantize(base, tmp, precision, options, calibration=calibration, source=source),
    )


def _file_sha256(path: Any) -> str | None:
    """sha256 of the file ``path`` names, ``None`` without one (the backend refuses a path that is no file)."""
    return cache.sha256_file(Path(path)) if path and Path(path).is_file() else None


def content_digest(artifact: Artifact) -> str:
    """sha256 over the artifact's model files (name and content hash of each, in name order): equal digests mean
    byte-identical model files, whatever folder they sit in."""
    files = sorted(artifact.files or (artifact.path,), key=lambda f: f.name)
    return cache.key_digest({"files": [[f.name, cache.sha256_file(f)] for f in files]})


def export_copy(artifact: Artifact, output_dir: Path | None) -> None:
    if output_dir is not None:
        for file in artifact.files:
            shutil.copyfile(file, output_dir / f"{artifact.source_name}.{artifact.precision}{file.suffix}")
