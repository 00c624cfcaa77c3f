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

import random
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

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


class _Unenumerable(Exception):
    """The space has a continuous parameter (or too many points) to list."""


class _ScriptedTrial:
    """Stands in for an Optuna trial to walk a conditional space: answers each ``suggest_*`` from ``script`` (choice
    indexes, in call order) and records the choices of the first unscripted one."""

    def __init__(self, script: Sequence[int]) -> None:
        self.script = list(script)
        self.params: dict[str, Any] = {}
        self.open_choices: int | None = None

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        step = len(self.params)
        index = self.script[step] if step < len(self.script) else 0
        if step == len(self.script):
            self.open_choices = len(choices)
        self.params[name] = choices[index]
        return choices[index]

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        if log:
            raise _Unenumerable(name)
        return self.suggest_categorical(name, list(range(low, high + 1, step)))

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False):
        if step is None or log:
            raise _Unenumerable(name)
        count = int(round((high - low) / step)) + 1
        return self.suggest_categorical(name, [low + i * step for i in range(count)])


def enumerate_space(backends: Sequence[str], limit: int = 10_000) -> list[dict[str, Any]] | None:
    """Every distinct parameter set :func:`suggest` can produce over ``backends`` (each as Optuna's ``trial.params``
    would hold it), in a stable order; ``None`` when the space has a continuous parameter or more than ``limit``
    points. The search uses it to tell when every configuration has been measured."""
    points: list[dict[str, Any]] = []
    pending: list[list[int]] = [[]]
    try:
        while pending:
            script = pending.pop()
            trial = _ScriptedTrial(script)
            suggest(trial, backends)  # type: ignore[arg-type]
            if trial.open_choices is None:  # every choice was scripted: one point
                points.append(trial.params)
            else:
                pending += [script + [i] for i in reversed(range(trial.open_choices))]
            if len(points) + len(pending) > limit:
                return None
    except _Unenumerable:
        return None
    return points


class DistinctSampler(optuna.samplers.BaseSampler):
    """``base`` (TPE) kept to configurations no trial of the study measured yet.

    Before each trial it lists the points of ``space`` (:func:`enumerate_space`) that no finished, measured or running
    trial holds; while the trial suggests its parameters one by one, a value ``base`` picks that leaves no such point
    is replaced by one that does (seeded choice), so every trial of the budget measures something new. Fixed
    parameters (enqueued trials) are taken as given. Sampling is independent per parameter, as TPE's default is.
    With an ``order`` (:class:`~mlflow_edge.search.precision.PrecisionOrder`) the unlikely points are left while
    others remain, and a trial takes the order's next step when it has one.
    """

    def __init__(self, base: optuna.samplers.BaseSampler, space: Sequence[dict[str, Any]], seed: int = 0,
                 order: Any = None) -> None:
        self.base = base
        self.space = list(space)
        self.open: list[dict[str, Any]] = list(space)
        self.order = order
        self.target: dict[str, Any] | None = None
        self._rng = random.Random(seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        self.open = unmeasured(self.space, others)
        self.target = None
        if self.order is not None:  # the order of precision: no unlikely point while others are left, a next step
            self.open = self.order.plausible(self.open, others)
            self.target = self.order.next_point(self.open, others)
        self.base.before_trial(study, trial)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        target = self.target
        if target is not None and param_name in target and all(target.get(k) == v for k, v in trial.params.items()):
            return target[param_name]
        value = self.base.sample_independent(study, trial, param_name, param_distribution)
        reachable = [p for p in self.open if all(k in p and p[k] == v for k, v in trial.params.items())]
        allowed = [p[param_name] for p in reachable if param_name in p]
        if not allowed or value in allowed:
            return value
        return self._rng.choice(list(dict.fromkeys(allowed)))

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def counts_as_measured(trial: FrozenTrial) -> bool:
    """Whether ``trial``'s configuration is taken: measured (complete or pruned), failing for a reason of its own
    (an ``error``), being measured now or queued. Trials a stopped process left behind are not (their retry is)."""
    if trial.state == TrialState.FAIL:
        return "error" in trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def unmeasured(space: Sequence[dict[str, Any]], trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """The points of ``space`` no trial in ``trials`` has taken (:func:`counts_as_measured`)."""
    taken = [t.params for t in trials if counts_as_measured(t)]
    return [point for point in space if point not in taken]


def space_digest(space: Sequence[dict[str, Any]] | None, backends: Sequence[str]) -> str:
    """A short fingerprint of the search space (its points, or the backends and their framework versions when the
    space cannot be listed): workers of one study must agree on it."""
    import hashlib
    import json

    basis = space if space is not None else {b: get_backend(b).versions() for b in backends}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]
