"""After the search: the feasible Pareto front (``study.best_trials``) as a table and plots logged on the parent run
(``search/``), and the model files of the trials worth keeping (the front and the policy's best) logged into their
runs."""

from __future__ import annotations

import html
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import mlflow
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from mlflow_edge import registry
from mlflow_edge.artifacts import convert, quantize
from mlflow_edge.metrics import METRICS
from mlflow_edge.runs import progress, store_model
from mlflow_edge.search.plots import point_label, write_front_plots

if TYPE_CHECKING:
    from mlflow_edge.search.objective import Objective


def pareto_table(study: optuna.Study, objectives: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """The feasible Pareto front (``study.best_trials``, one row per MLflow run): trial, backend, precision, options,
    metrics, run id."""
    rows = []
    for trial in sorted(study.best_trials, key=lambda t: t.number):
        metrics = trial.user_attrs.get("metrics", {})
        rows.append({
            "trial": trial.number, "backend": trial.user_attrs.get("backend"),
            "precision": trial.user_attrs.get("precision"),
            "options": json.dumps(trial.user_attrs.get("options", {}), sort_keys=True),
            **{m: metrics.get(m, math.nan) for m in METRICS}, "run_id": trial.user_attrs.get("run_id"),
        })
    columns = ["trial", "backend", "precision", "options", *METRICS, "run_id"]
    table = pd.DataFrame(rows, columns=columns).drop_duplicates("run_id")  # a repeated trial reuses its twin's run
    return table.sort_values([m for m, _ in objectives], ascending=[d == "minimize" for _, d in objectives])


def write_search_report(study: optuna.Study, objectives: Sequence[tuple[str, str]], out_dir: Path,
                        champion_run_id: str | None = None) -> list[Path]:
    """``pareto.csv``, ``pareto.html``, ``trials.csv``, the 2-D labelled fronts (``front_size_mb_vs_kld_mean``,
    ``front_size_mb_vs_decode_tok_s``; the champion marked) and Optuna's plots, each as PNG (matplotlib) and
    interactive HTML (plotly): ``pareto_front`` (or ``optimization_history`` for one objective) and, when the trials
    vary, ``param_importances``."""
    import matplotlib.pyplot as plt
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as oplt

    table = pareto_table(study, objectives)
    table.to_csv(out_dir / "pareto.csv", index=False)
    (out_dir / "pareto.html").write_text(
        f"<h1>Pareto front of {html.escape(study.study_name)}</h1>\n"
        + table.to_html(index=False, float_format=lambda v: f"{v:.4g}"),
        encoding="utf-8")
    study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    write_front_plots(trial_points(study, champion_run_id), out_dir, study.study_name)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = [m for m, _ in objectives]
    plots = []
    if complete:
        if len(objectives) in (2, 3):
            plots.append(("pareto_front", lambda m: m.plot_pareto_front(study, target_names=names)))
        elif len(objectives) == 1:
            plots.append(("optimization_history", lambda m: m.plot_optimization_history(study, target_name=names[0])))
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) > 1:
        plots.append(("param_importances", lambda m: m.plot_param_importances(study)))
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # importance caveats of tiny studies
                axes = plot(oplt)
                plot(vis).write_html(out_dir / f"{name}.html", include_plotlyjs=True)
        except Exception as exc:  # optuna refuses plots of too few or too uniform trials
            progress(f"skipped {name} plot: {type(exc).__name__}: {exc}")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(out_dir / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
    return sorted(out_dir.iterdir())


def feasible(trial: FrozenTrial) -> bool:
    """A complete, measured trial that passed every gate (all its constraints ``<= 0``)."""
    attrs = trial.user_attrs
    return (trial.state == TrialState.COMPLETE and "run_id" in attrs and "metrics" in attrs
            and all(v <= 0 for v in attrs.get("constraints", {}).values()))


def trials_worth_storing(study: optuna.Study, policy: registry.Policy) -> list[FrozenTrial]:
    """The feasible Pareto front and the policy's best feasible trial (the champion-to-be): the trials whose model
    files are logged."""
    chosen = {t.number: t for t in study.best_trials if feasible(t)}
    pool = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if feasible(t) and "twin_of" not in t.user_attrs]
    if pool:  # the pick promotion makes: on the front of every objective, ties broken alike
        best = pool[policy.pick([t.user_attrs["metrics"] for t in pool])]
        chosen.setdefault(best.number, best)
    return [chosen[n] for n in sorted(chosen) if "twin_of" not in chosen[n].user_attrs]


def store_front_models(study: optuna.Study, objective: Objective, policy: registry.Policy) -> int:
    """Log the model files of :func:`trials_worth_storing` into their runs (once per content hash in the
    experiment); return the bytes logged."""
    stored = 0
    for trial in trials_worth_storing(study, policy):
        backend, precision = trial.user_attrs["backend"], trial.user_attrs["precision"]
        base = convert(objective.source, backend)
        artifact = quantize(objective.source, base, precision, trial.user_attrs.get("options", {}),
                            objective.calibration)
        stored += store_model(trial.user_attrs["run_id"], artifact, trial.user_attrs.get("metrics", {}))
    return stored


def trial_points(study: optuna.Study, champion_run_id: str | None) -> pd.DataFrame:
    """One row per measured trial for the front plots: label, feasible, on the front, champion, and its metrics (a
    pruned trial's are those of its screening)."""
    front = {t.number for t in study.best_trials}
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        metrics = trial.user_attrs.get("metrics") or trial.user_attrs.get("screen") or {}
        if not metrics or "twin_of" in trial.user_attrs:
            continue
        rows.append({"trial": trial.number, "label": point_label(trial.user_attrs.get("backend", "?"),
                                                                 trial.user_attrs.get("precision", "?"),
                                                                 trial.user_attrs.get("options", {})),
                     "feasible": feasible(trial), "on_front": trial.number in front and feasible(trial),
                     "champion": bool(champion_run_id) and trial.user_attrs.get("run_id") == champion_run_id,
                     **metrics})
    return pd.DataFrame(rows)


def log_search_report(study: optuna.Study, goals: Sequence[tuple[str, str]], champion_run_id: str | None) -> None:
    """:func:`write_search_report` logged on the active run, under ``search/``."""
    with tempfile.TemporaryDirectory() as tmp:
        write_search_report(study, goals, Path(tmp), champion_run_id)
        mlflow.log_artifacts(tmp, artifact_path="search")
