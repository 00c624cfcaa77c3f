"""The Optuna search: sample (backend, precision, options), quantize, evaluate against the reference, promote.

One parent MLflow run (role ``study``) holds the reference run and one nested run per trial (role ``candidate``,
tagged ``mlflow_edge.trial`` and ``optuna.study``). Gates are Optuna constraints (one value per gate group, ``<= 0``
when the group passes, set with ``Trial.set_constraint``), so the Pareto front (``study.best_trials``) holds only
feasible trials. Every trial measures a configuration no earlier trial of the study measured
(:class:`~mlflow_edge.search.space.DistinctSampler`); the search stops early when the space is exhausted. Evaluation
is cheap-first: a trial whose accuracy on the first windows already fails a gate even on its optimistic bound is
pruned before its timed runs. Model files are logged only for the feasible front and the policy's best (once per
content hash); every other trial keeps its metrics and the command that rebuilds its artifact. The study lives
in an Optuna RDB store (default ``optuna.db`` next to the MLflow sqlite store), so a second call with the same study
name resumes it and only runs what is left of the ``trials`` budget::

    from mlflow_edge.search import SearchConfig, run_search

    result = run_search(SearchConfig("demo", target="cpu", trials=8, gates="accuracy_retention>=0.95"))
    print(result["promotion"])

A study is driven by one process at a time: trials found RUNNING when a search starts were left by a stopped
process; they are marked FAIL (with their MLflow runs) and do not count against the budget.

The pieces live beside this module: the configuration (``config``), one trial (``objective``), the Optuna storage
(``storage``), who runs the trials (``workers``) and the report and stored models (``report``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import mlflow
import optuna
from optuna.trial import TrialState

from mlflow_edge import __version__
from mlflow_edge.artifacts import convert
from mlflow_edge.backends import get_backend
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.harness import Evaluator, settings_record
from mlflow_edge.plan import planned
from mlflow_edge.registry import promote_study
from mlflow_edge.runs import evaluate_reference, log_new_params, progress, run_tags, tracked_run
from mlflow_edge.search.config import ResolvedSearch, SearchConfig
from mlflow_edge.search.objective import Objective
from mlflow_edge.search.precision import PrecisionOrder, gated_starting_points
from mlflow_edge.search.report import log_search_report, pareto_table, store_front_models
from mlflow_edge.search.space import backends_for_model, enumerate_space, space_digest, unmeasured
from mlflow_edge.search.storage import default_storage, fail_stale_trials, open_storage, open_study, redacted
from mlflow_edge.search.workers import (
    COORDINATION_ATTR,
    REFERENCE_ATTR,
    DeviceWorkers,
    finish_study,
    measured_count,
    precision_order,
    run_trials,
    run_worker,
    trial_sampler,
    trials_to_run,
)
from mlflow_edge.sources import SourceModel, resolve_source

# run_worker is imported from here by `mlflow-edge search --worker`
__all__ = ["SearchConfig", "run_search", "run_worker", "starting_points"]

DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass(frozen=True)
class _OpenedStudy:
    """The study one search call drives, as opened: its name and storage (without password), the trials it held
    before this call, its space and order of precision, and how many trials are left to run (``None``: unbounded)."""

    study: optuna.Study
    name: str
    storage_label: str
    before: int
    space: list[dict[str, Any]] | None
    order: PrecisionOrder | None
    remaining: int | None


def run_search(config: SearchConfig) -> dict[str, Any]:
    """Search the target's installed backends with Optuna for ``config.trials`` trials (or ``config.timeout``
    seconds), log every trial as a nested MLflow run, the Pareto front on the parent, and promote the best feasible
    one by ``config.policy``.

    The configuration is checked (:meth:`SearchConfig.resolved`) and the storage opened before any run is. Every
    trial measures a configuration no earlier trial measured; the search stops early when none is left. Model files
    are logged for the feasible front and the policy's best only. With ``coordinate_only`` no trial runs here:
    workers (:func:`~mlflow_edge.search.workers.run_worker`) on the target's hardware measure them, and this process
    says who works until the budget is measured (a ``timeout`` with no worker is an error). Returns ``{"study",
    "storage", "run_id", "trials", "new_trials", "pareto", "promotion", "distinct_left", "bytes_logged"}``.
    """
    search = config.resolved()
    storage_url = config.storage or default_storage()
    storage_label = redacted(storage_url)
    optuna_storage = open_storage(storage_url)
    with tracked_run(config.run_name, config.experiment,
                     tags=run_tags(config.target, "search", "study", search.backends)) as parent:
        source = resolve_source(config.model)
        search = _fitted_to(search, source)
        name = config.study_name or f"{source.name}-{config.target}"
        _log_parent(parent, search, source, name, storage_label)
        for backend in search.backends:  # convert once per (source, backend); every trial reuses it from the cache
            base = convert(source, backend)
            progress(f"base {backend} {base.precision}: {base.size_bytes / 1e6:.1f} MB")
        opened = _open(optuna_storage, storage_label, name, search, source, parent)
        objective = _objective(search, source, name, opened.order)
        runner = DeviceWorkers(name, config.target, storage_label, config.timeout) if search.coordinate_only else None
        bytes_logged = _measure(opened, objective, search, runner)
        return _conclude(parent, opened, source, search, bytes_logged)


def _fitted_to(search: ResolvedSearch, source: SourceModel) -> ResolvedSearch:
    """``search`` narrowed to the backends that can convert ``source``, with the settings of the model's plan (its
    notes said, its params logged)."""
    backends, unsupported = backends_for_model(search.backends, source)
    for backend, reason in unsupported.items():
        progress(f"leaving out {backend}: {reason}")
    if not backends:
        raise EdgeError(f"no backend for target '{search.config.target}' can convert {source.name}: "
                        + "; ".join(unsupported.values()))
    settings = search.settings
    plan = planned(source, backends, settings.window, settings.reference_dtype,
                   chosen=search.config.backends is not None)
    for note in plan.notes:
        progress(note)
    log_new_params(dict(plan.params))
    return dataclasses.replace(search, backends=plan.backends,
                               settings=dataclasses.replace(settings, reference_dtype=plan.reference_dtype))


def _log_parent(parent: mlflow.ActiveRun, search: ResolvedSearch, source: SourceModel, name: str,
                storage_label: str) -> None:
    """The parent run named after the study, with the study's tags, the gates the mode dropped and the params."""
    config = search.config
    mlflow.MlflowClient().update_run(parent.info.run_id, name=name)  # a readable parent: the study's name
    mlflow.set_tags({"mlflow_edge.study": name, "optuna.study": name, "optuna.storage": storage_label,
                     "mlflow_edge.measured": "accuracy,size" if config.accuracy_only else "all"})
    if search.dropped:
        mlflow.set_tag("gates.dropped", ",".join(search.dropped))
        progress(f"accuracy/size-only mode: gates {', '.join(search.dropped)} cannot be checked here and are dropped")
    log_new_params({"model": config.model, "source": source.name, "source.sha256": source.sha256,
                    "target": config.target, "backends": ",".join(search.backends), "trials": config.trials,
                    "timeout": config.timeout, "objectives": ",".join(f"{d[:3]}:{m}" for m, d in search.goals),
                    "gates": str(search.gates), "policy": config.policy, "seed": config.seed, "study": name,
                    "accuracy_only": config.accuracy_only, "screen_windows": search.screen_windows,
                    "prune_margin": config.prune_margin, "fidelity": config.fidelity,
                    "gate_confidence": config.gate_confidence, **search.settings.params()})


def _open(storage: optuna.storages.BaseStorage, storage_label: str, name: str, search: ResolvedSearch,
          source: SourceModel, parent: mlflow.ActiveRun) -> _OpenedStudy:
    """The study ``name`` created or resumed: stale trials failed (and queued again), its sampler set, a new study's
    starting points queued, what workers need to join recorded, and what is left of the budget said."""
    config, backends = search.config, search.backends
    study = open_study(storage, name, search.goals, config.objectives, storage_label)
    before = len(study.trials)  # the retries of stale trials below are new trials of this call
    stale = fail_stale_trials(study)
    if stale:
        progress(f"marked trial(s) {', '.join(map(str, stale))} FAIL: left RUNNING by a stopped search; their "
                 "configurations are queued again")
    space = enumerate_space(backends)
    order = precision_order(space, backends, source, search.gates, search.calibration)
    study.sampler = trial_sampler(space, config.seed + before, config.trials, order)
    if before == 0:  # a new study: the backends' usual defaults (or the gates' bits) first, as the budget allows
        for point in gated_starting_points(starting_points(backends), order, search.gates)[:config.trials]:
            study.enqueue_trial(point, skip_if_exists=True)
    study.set_user_attr(COORDINATION_ATTR, _coordination_record(search, parent, space))
    done = measured_count(study)
    remaining = trials_to_run(study, space, max(config.trials - done, 0) if config.trials and config.trials >= 1
                              else None)
    progress(f"study {name}: {done} trial(s) done, {remaining if remaining is not None else 'unbounded'} to run "
             f"over {', '.join(backends)}")
    return _OpenedStudy(study, name, storage_label, before, space, order, remaining)


def _coordination_record(search: ResolvedSearch, parent: mlflow.ActiveRun,
                         space: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What a worker needs to join the study (:data:`~mlflow_edge.search.workers.COORDINATION_ATTR`): the version
    and space it must share, the parent run to nest under, and the search's settings, gates and budget."""
    config, backends = search.config, search.backends
    return {"version": __version__, "space": space_digest(space, backends), "parent_run_id": parent.info.run_id,
            "experiment_id": parent.info.experiment_id, "model": config.model, "target": config.target,
            "backends": list(backends), "gates": str(search.gates), "objectives": config.objectives,
            "settings": settings_record(search.settings), "calibration": config.calibration_path,
            "screen_windows": search.screen_windows, "prune_margin": config.prune_margin, "budget": config.trials}


def _objective(search: ResolvedSearch, source: SourceModel, name: str, order: PrecisionOrder | None) -> Objective:
    """The trials' objective; its evaluator times nothing where this machine lacks the target's hardware."""
    config = search.config
    here = search.settings if search.measurable else dataclasses.replace(search.settings, speed=False)
    return Objective(source, search.backends, config.target, name, search.goals, search.gates,
                     Evaluator(source, here), search.calibration, search.screen_windows, config.prune_margin,
                     model_spec=config.model, calibration_path=config.calibration_path, order=order)


def _measure(opened: _OpenedStudy, objective: Objective, search: ResolvedSearch,
             runner: DeviceWorkers | None) -> int:
    """The reference and the trials left of the budget (here, or by the ``runner``'s workers), then those the
    workers' deaths queued again; then the model files of the trials worth keeping, whose bytes it returns."""
    config, study = search.config, opened.study
    try:
        if opened.remaining != 0:  # a study with nothing left to run measures nothing again
            evaluate_reference(objective.evaluator, config.target, opened.name)
            study.set_user_attr(REFERENCE_ATTR, objective.evaluator.reference_metrics)
            run_trials(study, objective, config.trials, config.timeout, opened.space, runner)
        finish_study(study, objective, config.trials, config.timeout, opened.space, runner)
        return store_front_models(study, objective, search.policy)
    finally:
        objective.evaluator.close()


def _conclude(parent: mlflow.ActiveRun, opened: _OpenedStudy, source: SourceModel, search: ResolvedSearch,
              bytes_logged: int) -> dict[str, Any]:
    """Log the study's counts, promote its best feasible trial, log the report (champion or not) and say the
    outcome (:func:`run_search`'s result)."""
    study, goals, name = opened.study, search.goals, opened.name
    mlflow.log_metric("bytes_logged", bytes_logged)
    table = pareto_table(study, goals)
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in DONE_STATES}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    progress(f"Pareto front: {len(table)} feasible trial(s) of {len(study.trials)} "
             f"({', '.join(f'{v} {k}' for k, v in counts.items())}); {bytes_logged / 1e6:.1f} MB of models logged")
    promotion = None
    try:
        promotion = promote_study(parent, name, source.name, search.config.target, search.gates, search.policy,
                                  search.config.registered_model)
    finally:  # the report stands whether or not a champion came out of it
        promoted = promotion is not None and not promotion.kept_champion
        log_search_report(study, goals, promotion.run_id if promoted else None)
    left = None if opened.space is None else len(unmeasured(opened.space, study.get_trials(deepcopy=False)))
    return {"study": name, "storage": opened.storage_label, "run_id": parent.info.run_id,
            "trials": len(study.trials), "new_trials": len(study.trials) - opened.before,
            "pareto": table.to_dict("records"), "promotion": promotion.describe(), "distinct_left": left,
            "bytes_logged": bytes_logged}


def starting_points(backends: Sequence[str]) -> list[dict[str, Any]]:
    """Every backend's defaults as full trial parameters (``backend`` first), tried first by a new study: each
    backend's first default, then each one's second … (a small budget reaches every backend)."""
    defaults = [[{"backend": name, **point} for point in get_backend(name).starting_points()] for name in backends]
    return [points[rank] for rank in range(max(map(len, defaults), default=0))
            for points in defaults if rank < len(points)]
