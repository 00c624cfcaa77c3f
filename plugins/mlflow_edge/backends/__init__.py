"""Backends, found through the entry-point group ``mlflow_edge.backends`` (name → Backend class).

mlflow-edge registers its own backends there (``setup.cfg``); any installed distribution can add one the same way,
and every process (the CLI, the evaluation worker, ``mlflow run``) sees the same set. Nothing else in the package
lists backends by name.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from mlflow_edge.backends.base import Artifact, Backend, Generation, OptionSpec, Runner, missing_members
from mlflow_edge.errors import EdgeError, first_line

ENTRY_POINT_GROUP = "mlflow_edge.backends"

__all__ = ["Artifact", "Backend", "ENTRY_POINT_GROUP", "EdgeError", "Generation", "OptionSpec", "Runner",
           "backend_for_format", "backend_names", "get_backend", "open_local_artifact"]


def _distribution(entry: EntryPoint) -> str:
    return entry.dist.name if entry.dist is not None else entry.value


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    """The group's entry points by name; a name claimed by two distributions is refused (as pluggy refuses a second
    plugin of one name) rather than won silently by one of them."""
    found: dict[str, EntryPoint] = {}
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, _distribution(e))):
        first = found.setdefault(entry.name, entry)
        if first is not entry and first.value != entry.value:
            raise EdgeError(f"backend '{entry.name}' is registered twice: by {_distribution(first)} "
                            f"({first.value}) and by {_distribution(entry)} ({entry.value}); uninstall one")
    return found


def backend_names() -> tuple[str, ...]:
    """Names of every registered backend (installed framework or not), sorted."""
    return tuple(_entry_points())


@functools.cache
def _backend_class(name: str) -> type:
    try:
        entry = _entry_points()[name]
    except KeyError:
        raise EdgeError(f"unknown backend '{name}' (choose from {', '.join(backend_names()) or 'none'})") from None
    try:
        backend_class = entry.load()
    except Exception as exc:  # a third-party plugin that does not import: name it, do not crash the caller
        raise EdgeError(f"backend '{name}' ({entry.value}) cannot be loaded: {first_line(exc)}") from exc
    if getattr(backend_class, "name", None) != name:
        raise EdgeError(f"backend entry point '{name}' points to {entry.value}, whose name is "
                        f"'{getattr(backend_class, 'name', None)}'")
    if missing := missing_members(backend_class):
        raise EdgeError(f"backend '{name}' ({entry.value}, from {_distribution(entry)}) lacks the Backend "
                        f"member(s) {', '.join(missing)}")
    return backend_class


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``."""
    return _backend_class(name)()


def optional_method(name: str, method: str) -> Any:
    """The backend ``name``'s ``method`` where it implements one of the Protocol's optional methods
    (``precision_bits``, ``estimated_kld``, ``resource_needs``), else ``None``: a third-party backend written
    before them is used without."""
    return getattr(get_backend(name), method, None)


def loadable_backends() -> tuple[Backend, ...]:
    """Every registered backend whose module imports (its framework may still be missing). Two backends writing
    one format are refused: which of them a logged model of that format belongs to would depend on their names."""
    found: dict[str, Backend] = {}
    for name in backend_names():
        try:
            backend = get_backend(name)
        except EdgeError:
            continue
        if (other := found.setdefault(backend.format, backend)) is not backend:
            raise EdgeError(f"backends '{other.name}' (from {_distribution(_entry_points()[other.name])}) and "
                            f"'{name}' (from {_distribution(_entry_points()[name])}) both write format "
                            f"'{backend.format}'; uninstall one")
    return tuple(found.values())


def backend_for_format(artifact_format: str) -> Backend:
    """The registered backend writing ``artifact_format`` (the conventions' ``format`` param)."""
    for backend in loadable_backends():
        if backend.format == artifact_format:
            return backend
    known = sorted({b.format for b in loadable_backends()})
    raise EdgeError(f"no backend writes format '{artifact_format}' (known: {', '.join(known) or 'none'})")


def open_local_artifact(path: Path, source: Any) -> Artifact:
    """A model file or folder on disk as an :class:`Artifact` of the backend that recognizes it."""
    if not path.exists():
        raise EdgeError(f"no such file or folder: {path}")
    for backend in loadable_backends():
        artifact = backend.open_artifact(path.resolve(), source)
        if artifact is not None:
            return artifact
    raise EdgeError(f"{path} is no model file or folder of a registered backend ({', '.join(backend_names())})")
