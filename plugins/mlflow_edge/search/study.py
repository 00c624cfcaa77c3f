"""The Optuna search: sample (backend, precision, options), quantize, evaluate against the reference, promote.

One parent MLflow run (role ``study``) holds the reference run and one nested run per trial (role ``candidate``,
tagged ``mlflow_edge.trial`` and ``optuna.study``). Gates are Optuna constraints (one value per gate group, ``<= 0``
when the group passes), so the Pareto front (``study.best_trials``) holds only feasible trials. The study lives in an
Optuna RDB store (default ``optuna.db`` next to the MLflow sqlite store), so a second call with the same study name
resumes it and only runs what is left of the ``trials`` budget::

    from mlflow_edge.search import run_search

    result = run_search("demo", target="cpu", trials=8, gates="accuracy_retention>=0.95")
    print(result["promotion"])

A study is driven by one process at a time: trials found RUNNING when a search starts were left by a stopped
process; they are marked FAIL (with their MLflow runs) and do not count against the budget.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import mlflow
import optuna
import pandas as pd
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mlflow_edge import registry
from mlflow_edge.backends.base import EdgeError
from mlflow_edge.evaluation.data import calibration_text, check_disjoint
from mlflow_edge.evaluation.harness import EvalSettings, Evaluator
from mlflow_edge.gates import METRICS, Gates, parse_gates
from mlflow_edge.search.space import backends_for, suggest
from mlflow_edge.sources import resolve_source
from mlflow_edge.targets import get_target
from mlflow_edge.workflow import (
    ERROR_TAG, base_precision, convert, evaluate_candidate, evaluate_reference, log_new_params, progress,
    promote_study, quantize, run_tags, tracked_run,
)

MULTI_OBJECTIVE: tuple[tuple[str, str], ...] = (
    ("decode_tok_s", "maximize"), ("size_mb", "minimize"), ("accuracy_retention", "maximize"),
)
"""``objectives="multi"``: fast, small and faithful."""

DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STALE_REASON = "interrupted: the trial was left RUNNING by a stopped search"


def parse_objectives(spec: str) -> tuple[tuple[str, str], ...]:
    """``"multi"`` or comma-separated ``max:<metric>``/``min:<metric>`` → ``((metric, direction), …)``."""
    if spec == "multi":
        return MULTI_OBJECTIVE
    parsed = []
    for part in str(spec).split(","):
        direction, _, metric = part.strip().partition(":")
        if direction not in ("max", "min") or metric not in METRICS:
            raise EdgeError(f"bad objectives '{spec}': use 'multi', or max:<metric> / min:<metric> with a conventions "
                            "metric")
        parsed.append((metric, "maximize" if direction == "max" else "minimize"))
    if len({m for m, _ in parsed}) != len(parsed):
        raise EdgeError(f"bad objectives '{spec}': a metric appears twice")
    return tuple(parsed)


def gate_violations(gates: Gates, metrics: dict[str, float]) -> list[float]:
    """One Optuna constraint per gate group: 0 when it passes, else the smallest relative shortfall of its gates
    (1e6 when a gated metric is missing)."""
    violations = []
    for group in gates.check(metrics).groups:
        if group.passed:
            violations.append(0.0)
            continue
        shortfalls = []
        for result in group.results:
            if result.value is None:
                shortfalls.append(1e6)
            else:
                gap = (result.gate.threshold - result.value if result.gate.op == ">="
                       else result.value - result.gate.threshold)
                shortfalls.append(max(gap, 0.0) / max(abs(result.gate.threshold), 1e-9) or 1e-9)
        violations.append(min(shortfalls))
    return violations


def constraints(trial: FrozenTrial) -> list[float]:
    """The ``constraints_func`` of the sampler: the violations the objective stored on the trial."""
    return list(trial.user_attrs.get("constraints", [1e6]))


def default_storage() -> str:
    """``sqlite:///<dir>/optuna.db``: next to the MLflow sqlite store, else in the working directory."""
    uri = mlflow.get_tracking_uri()
    folder = Path.cwd()
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).resolve().parent
    return f"sqlite:///{folder / 'optuna.db'}"


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING (by a stopped process) FAIL; return their numbers."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "error", STALE_REASON)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return [t.number for t in stale]


def _fail_stale_runs(experiment_id: str, study_name: str, current_run: str) -> None:
    client = MlflowClient()
    query = f"tags.`optuna.study` = '{study_name}' AND attributes.status = 'RUNNING'"
    runs = client.search_runs([experiment_id], query)
    for run in runs:
        if run.info.run_id != current_run:
            client.set_tag(run.info.run_id, ERROR_TAG, STALE_REASON)
            client.set_terminated(run.info.run_id, "FAILED")


def pareto_table(study: optuna.Study, objectives: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """The feasible Pareto front: trial, backend, precision, options, gate result, metrics, MLflow run id."""
    rows = []
    for trial in sorted(study.best_trials, key=lambda t: t.number):
        metrics = trial.user_attrs.get("metrics", {})
        rows.append({
            "trial": trial.number, "backend": trial.user_attrs.get("backend"),
            "precision": trial.user_attrs.get("precision"),
            "options": json.dumps(trial.user_attrs.get("options", {}), sort_keys=True),
            "gates": "pass" if not any(v > 0 for v in trial.user_attrs.get("constraints", [])) else "fail",
            **{m: metrics.get(m, math.nan) for m in METRICS}, "run_id": trial.user_attrs.get("run_id"),
        })
    columns = ["trial", "backend", "precision", "options", "gates", *METRICS, "run_id"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values([m for m, _ in objectives], ascending=[d == "minimize" for _, d in objectives])


def write_search_report(study: optuna.Study, objectives: Sequence[tuple[str, str]], out_dir: Path) -> list[Path]:
    """``pareto.csv``, ``pareto.html``, ``trials.csv``, ``pareto_front.png`` (or ``optimization_history.png``) and,
    when the trials vary, ``param_importances.png``."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    table = pareto_table(study, objectives)
    table.to_csv(out_dir / "pareto.csv", index=False)
    (out_dir / "pareto.html").write_text(
        f"<h1>Pareto front of {study.study_name}</h1>\n"
        + table.to_html(index=False, float_format=lambda v: f"{v:.4g}"),
        encoding="utf-8")
    study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = [m for m, _ in objectives]
    plots = []
    if complete:
        if len(objectives) > 1 and len(objectives) <= 3:
            plots.append(("pareto_front.png",
                          lambda: oplt.plot_pareto_front(study, target_names=names, constraints_func=constraints)))
        elif len(objectives) == 1:
            plots.append(("optimization_history.png",
                          lambda: oplt.plot_optimization_history(study, target_name=names[0])))
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) > 1:
        plots.append(("param_importances.png", lambda: oplt.plot_param_importances(study)))
    for filename, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # importance caveats of tiny studies
                axes = plot()
        except Exception as exc:  # optuna refuses plots of too few or too uniform trials
            progress(f"skipped {filename}: {type(exc).__name__}: {exc}")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(out_dir / filename, dpi=110, bbox_inches="tight")
        plt.close(figure)
    return sorted(out_dir.iterdir())


def run_search(model: str, target: str = "cpu", trials: int = 8, timeout: float | None = None,
               objectives: str = "multi", gates: str | Sequence[str] | Gates | None = None,
               policy: str = "min:size_mb", seed: int = 0, storage: str | None = None, study_name: str | None = None,
               registered_model: str | None = None, settings: EvalSettings | None = None,
               calibration_path: str | None = None, experiment: str | None = None) -> dict[str, Any]:
    """Search the target's installed backends with Optuna for ``trials`` trials (or ``timeout`` seconds), log every
    trial as a nested MLflow run, the Pareto front on the parent, and promote the best feasible one by ``policy``.

    Returns ``{"study", "storage", "run_id", "trials", "new_trials", "pareto", "promotion"}``.
    """
    get_target(target)
    if (trials is None or trials < 1) and timeout is None:
        raise EdgeError(f"a budget of 0: give trials >= 1 or a timeout (got trials={trials})")
    gate_spec = parse_gates(gates)
    registry.parse_policy(policy)
    goals = parse_objectives(objectives)
    backends = backends_for(target)
    if not backends:
        raise EdgeError(f"no installed backend for target '{target}' (it recommends "
                        f"{', '.join(get_target(target).primary + get_target(target).secondary)})")
    settings = settings or EvalSettings()
    calibration = calibration_text(calibration_path)
    check_disjoint(settings.text, calibration)
    storage_url = storage or default_storage()

    with tracked_run("search", experiment, tags=run_tags(target, "search", "study", backends)) as parent:
        source = resolve_source(model)
        name = study_name or f"{source.name}-{target}"
        mlflow.set_tags({"mlflow_edge.study": name, "optuna.study": name, "optuna.storage": storage_url})
        log_new_params({"model": model, "source": source.name, "source.sha256": source.sha256, "target": target,
                        "backends": ",".join(backends), "trials": trials, "timeout": timeout,
                        "objectives": ",".join(f"{d[:3]}:{m}" for m, d in goals), "gates": str(gate_spec),
                        "policy": policy, "seed": seed, "study": name, **settings.params()})
        try:
            study = optuna.create_study(
                storage=storage_url, study_name=name, load_if_exists=True, directions=[d for _, d in goals],
                sampler=optuna.samplers.TPESampler(seed=seed, constraints_func=constraints),  # reseeded below
            )
        except ValueError as exc:
            raise EdgeError(f"cannot open Optuna study '{name}' in {storage_url}: {exc}".splitlines()[0]) from None
        if [d.name.lower() for d in study.directions] != [d for _, d in goals]:
            raise EdgeError(f"Optuna study '{name}' has other objectives than '{objectives}'; use another study name")
        stale = fail_stale_trials(study)
        _fail_stale_runs(parent.info.experiment_id, name, parent.info.run_id)
        if stale:
            progress(f"marked trial(s) {', '.join(map(str, stale))} FAIL: left RUNNING by a stopped search")
        before = len(study.trials)
        # A resumed study draws on from where it stopped instead of replaying the first call's random start-up trials.
        study.sampler = optuna.samplers.TPESampler(seed=seed + before, constraints_func=constraints)
        done = sum(t.state in DONE_STATES and t.number not in stale for t in study.get_trials(deepcopy=False))
        remaining = max(trials - done, 0) if trials and trials >= 1 else None
        progress(f"study {name}: {done} trial(s) done, {remaining if remaining is not None else 'unbounded'} to run "
                 f"over {', '.join(backends)}")

        evaluator = Evaluator(source, settings)
        try:
            evaluate_reference(evaluator, target, name)

            def objective(trial: optuna.Trial) -> tuple[float, ...]:
                backend, precision, options = suggest(trial, backends)
                trial.set_user_attr("backend", backend)
                trial.set_user_attr("precision", precision)
                trial.set_user_attr("options", options)
                tags = {**run_tags(target, name, "candidate", [backend]), "mlflow_edge.trial": str(trial.number),
                        "optuna.study": name}
                try:
                    with tracked_run(f"trial-{trial.number}-{precision}", nested=True, tags=tags) as run:
                        trial.set_user_attr("run_id", run.info.run_id)
                        base = convert(source, backend, base_precision(backend))
                        artifact = quantize(source, base, precision, options, calibration)
                        metrics = evaluate_candidate(evaluator, artifact, gate_spec, target, name)["metrics"]
                except Exception as exc:
                    reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
                    trial.set_user_attr("error", (reason.splitlines() or [""])[0][:1000])
                    progress(f"trial {trial.number} ({backend} {precision}) failed: {reason}")
                    raise
                trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
                trial.set_user_attr("constraints", gate_violations(gate_spec, metrics))
                return tuple(float(metrics.get(m, math.nan)) for m, _ in goals)

            if remaining != 0:
                study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(Exception,),
                               show_progress_bar=True)
        finally:
            evaluator.close()

        with tempfile.TemporaryDirectory() as tmp:
            write_search_report(study, goals, Path(tmp))
            mlflow.log_artifacts(tmp, artifact_path="search")
        table = pareto_table(study, goals)
        progress(f"Pareto front: {len(table)} feasible trial(s) of {len(study.trials)}")
        promotion = promote_study(parent, name, source, target, gate_spec, policy, registered_model)
        return {"study": name, "storage": storage_url, "run_id": parent.info.run_id, "trials": len(study.trials),
                "new_trials": len(study.trials) - before, "pareto": table.to_dict("records"),
                "promotion": promotion.describe()}
