"""The search space: a backend first, then that backend's own precisions and options.

The space is conditional: ``backend`` is sampled from the target's installed backends, and each backend samples its
own parameters (``<backend>.<option>``) through :meth:`~mlflow_edge.backends.base.Backend.search_space`, so this
module knows no framework::

    >>> import optuna
    >>> trial = optuna.create_study().ask()
    >>> backend, precision, options = suggest(trial, backends_for("cpu"))
    >>> backend in backends_for("cpu")
    True
"""

from __future__ import annotations

from typing import Any, Sequence

import optuna

from mlflow_edge.backends import backend_names, get_backend
from mlflow_edge.sources import SourceModel
from mlflow_edge.targets import recommended_backends


def backends_for(target: str) -> tuple[str, ...]:
    """The registered and installed backends recommended for ``target`` (:class:`EdgeError` for an unknown target)."""
    installed = []
    for name in recommended_backends(target):
        if name not in backend_names():
            continue
        try:
            get_backend(name).versions()
        except Exception:  # the framework is not installed or does not import
            continue
        installed.append(name)
    return tuple(installed)


def backends_for_model(backends: Sequence[str], source: SourceModel) -> tuple[tuple[str, ...], dict[str, str]]:
    """Those of ``backends`` that can convert ``source``, and the reasons of those that cannot."""
    reasons = {name: get_backend(name).unsupported_reason(source) for name in backends}
    return tuple(n for n in backends if not reasons[n]), {n: r for n, r in reasons.items() if r}


def suggest(trial: optuna.Trial, backends: Sequence[str]) -> tuple[str, str, dict[str, Any]]:
    """``(backend, precision, options)`` sampled from ``trial``: the backend, then its own space."""
    backend = trial.suggest_categorical("backend", list(backends))
    precision, options = get_backend(backend).search_space(trial)
    return backend, precision, options
