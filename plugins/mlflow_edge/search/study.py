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

    from mlflow_edge.search import run_search

    result = run_search("demo", target="cpu", trials=8, gates="accuracy_retention>=0.95")
    print(result["promotion"])

A study is driven by one process at a time: trials found RUNNING when a search starts were left by a stopped
process; they are marked FAIL (with their MLflow runs) and do not count against the budget.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import shlex
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import mlflow
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from mlflow_edge import __version__, cache, procs, registry
from mlflow_edge.artifacts import content_digest, convert, quantize
from mlflow_edge.backends import get_backend
from mlflow_edge.errors import EdgeError, first_line
from mlflow_edge.evaluation.data import TextSlice, calibration_text, check_disjoint
from mlflow_edge.evaluation.harness import EvalSettings, Evaluator, settings_from_record, settings_record
from mlflow_edge.gates import Gates, parse_gates, resolve_gates
from mlflow_edge.metrics import ACCURACY_SIZE_METRICS, METRICS
from mlflow_edge.plan import planned
from mlflow_edge.runs import (
    ACCURACY_FROM_TAG,
    earlier_accuracy,
    end_stale_run,
    evaluate_candidate,
    evaluate_reference,
    log_new_params,
    progress,
    promote_study,
    run_tags,
    store_model,
    tracked_run,
)
from mlflow_edge.search.plots import point_label, write_front_plots
from mlflow_edge.search.precision import (
    BITS_ATTR,
    ESTIMATED_ATTR,
    PREDICTED_ATTR,
    PrecisionOrder,
    SensitivityEstimate,
    gated_starting_points,
)
from mlflow_edge.search.space import (
    DistinctSampler,
    backends_for,
    backends_for_model,
    counts_as_measured,
    enumerate_space,
    space_digest,
    suggest,
    unmeasured,
)
from mlflow_edge.sources import SourceModel, resolve_source
from mlflow_edge.targets import get_target, hardware_fingerprint, is_measurable

MULTI_OBJECTIVE: tuple[tuple[str, str], ...] = (
    ("decode_tok_s", "maximize"), ("size_mb", "minimize"), ("accuracy_retention", "maximize"),
)
"""``objectives="multi"``: fast, small and faithful."""
ACCURACY_SIZE_OBJECTIVE: tuple[tuple[str, str], ...] = (("size_mb", "minimize"), ("accuracy_retention", "maximize"))
"""``objectives="multi"`` in the accuracy/size-only mode (no speed measured)."""

DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
COORDINATION_ATTR = "mlflow_edge"
"""Study user attribute: what workers need to join (version, space digest, parent run, settings, gates, budget)."""
REFERENCE_ATTR = "mlflow_edge.reference"
"""Study user attribute: the reference's metrics as the coordinator measured them."""
MAX_RETRIES = 2
"""How often a configuration whose worker died is queued again."""
REBUILD_TAG = registry.REBUILD_TAG
HEARTBEAT_ENV = "MLFLOW_EDGE_TRIAL_HEARTBEAT"
DEFAULT_HEARTBEAT_S = 60
"""Seconds between a running trial's heartbeats in the Optuna storage; a trial silent for four of them is stale."""
CONNECT_TIMEOUT_S = 10
"""How long opening a networked Optuna storage may wait for its server (one attempt, no retries)."""
_CONNECT_TIMEOUT_DRIVERS = frozenset({"psycopg", "psycopg2", "pymysql", "mysqldb"})  # take ``connect_timeout``


def parse_objectives(spec: str, accuracy_only: bool = False) -> tuple[tuple[str, str], ...]:
    """``"multi"`` or comma-separated ``max:<metric>``/``min:<metric>`` → ``((metric, direction), …)``."""
    if spec == "multi":
        return ACCURACY_SIZE_OBJECTIVE if accuracy_only else MULTI_OBJECTIVE
    parsed = []
    for part in str(spec).split(","):
        direction, _, metric = part.strip().partition(":")
        if direction not in ("max", "min") or metric not in METRICS:
            raise EdgeError(f"bad objectives '{spec}': use 'multi', or max:<metric> / min:<metric> with a conventions "
                            "metric")
        parsed.append((metric, "maximize" if direction == "max" else "minimize"))
    if len({m for m, _ in parsed}) != len(parsed):
        raise EdgeError(f"bad objectives '{spec}': a metric appears twice")
    unmeasured = [m for m, _ in parsed if accuracy_only and m not in ACCURACY_SIZE_METRICS]
    if unmeasured:
        raise EdgeError(f"objective {', '.join(unmeasured)} is not measured in the accuracy/size-only mode "
                        f"(choose from {', '.join(ACCURACY_SIZE_METRICS)})")
    return tuple(parsed)


def default_storage() -> str:
    """``sqlite:///<dir>/optuna.db``: next to the MLflow sqlite store, else in the working directory."""
    uri = mlflow.get_tracking_uri()
    folder = Path.cwd()
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).resolve().parent
    return f"sqlite:///{folder / 'optuna.db'}"


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the trials a stopped search left RUNNING, and end their MLflow runs FAILED
    (:func:`mlflow_edge.runs.end_stale_run`); return their numbers. Stale are the trials whose owner process on this
    host is gone, and, on any host, those whose Optuna heartbeat is older than the storage's grace period: a live
    search's trials are never touched."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        if procs.owner_gone(trial.user_attrs.get("owner")):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            on_stale_trial(study, trial)
    with warnings.catch_warnings():  # Optuna calls heartbeats experimental; they are what RDB storages offer
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # the heartbeat's way; its callback ends the MLflow runs
    still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return sorted(t.number for t in running if t.number not in still)


def fail_trial_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """End the MLflow run of a stale ``trial`` FAILED."""
    run_id = trial.user_attrs.get("run_id")
    if run_id:
        end_stale_run(run_id)


def on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose process stopped (the storage's stale-trial callback): end its MLflow run FAILED and queue its
    configuration again (at most :data:`MAX_RETRIES` times), so that no trial of the budget is lost when a worker
    dies."""
    fail_trial_run(study, trial)
    queue_again(study, trial)


def queue_again(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a WAITING copy of a stale ``trial``'s configuration, as Optuna's ``RetryFailedTrialCallback`` does (same
    ``failed_trial``/``retry_history`` system attributes), without the dead process's owner and run: the copy must not
    look stale itself between its start and its first attribute."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRIES:
        progress(f"trial {trial.number} stopped with its worker {len(history)} times: not queued again")
        return
    keep = {k: v for k, v in trial.user_attrs.items() if k not in ("owner", "run_id")}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, user_attrs=keep,
        system_attrs={"failed_trial": history[0], "retry_history": history}))


def heartbeat_interval() -> int:
    """``$MLFLOW_EDGE_TRIAL_HEARTBEAT`` seconds (default :data:`DEFAULT_HEARTBEAT_S`), a positive whole number."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return DEFAULT_HEARTBEAT_S
    if not text.isdigit() or int(text) < 1:
        raise EdgeError(f"{HEARTBEAT_ENV} must be a whole number of seconds >= 1, got {text!r}")
    return int(text)


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


def rebuild_command(model_spec: str, backend: str, precision: str, options: dict[str, Any],
                    calibration_path: str | None = None) -> str:
    """The ``mlflow-edge quantize …`` command that rebuilds a trial's artifact from its sampled settings."""
    options = {k: v for k, v in options.items() if v is not None}
    words = ["mlflow-edge", "quantize", "--model", model_spec, "--backend", backend, "--precision", precision]
    if calibration_path:
        words += ["--calibration-text", calibration_path]
    if options:
        words += ["--options", ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                         for k, v in sorted(options.items()))]
    return shlex.join(words)


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


def store_front_models(study: optuna.Study, objective: "Objective", policy: registry.Policy) -> int:
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


def earlier_twin(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial | None:
    """A finished earlier trial of ``study`` with the same parameters (its result stands for this one)."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if other.number < trial.number and other.params == trial.params:
            return other
    return None


class GaveWay(Exception):
    """This trial's configuration is being measured by another worker's trial that sampled it at the same time."""


def claim(trial: optuna.Trial) -> None:
    """Make sure one trial measures a configuration that two workers sampled at the same moment (each excludes the
    configurations of running trials, but not one whose parameters are still being written): mark this trial as
    sampled, then give way (:class:`GaveWay`, a FAIL without an ``error``: it never counts as measured) to a running
    trial with the same parameters that is older or has already claimed them; else claim them."""
    trial.set_user_attr("sampled", True)
    rival = concurrent_twin(trial.study, trial)
    if rival is not None:
        trial.set_user_attr("gave_way_to", rival.number)
        raise GaveWay(f"trial {rival.number} of another worker measures the same configuration")
    trial.set_user_attr("claimed", True)


def concurrent_twin(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial | None:
    """A running trial, other than ``trial``, with its parameters that measures them: sampled, not given way, and
    older than ``trial`` or already claimed."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = other.user_attrs
        if (other.number != trial.number and other.params == trial.params and "sampled" in attrs
                and "gave_way_to" not in attrs and (other.number < trial.number or "claimed" in attrs)):
            return other
    return None


@dataclasses.dataclass
class Objective:
    """One trial: sample, quantize (cached), screen accuracy on a first slice, measure fully, log, score.

    A trial's run holds metrics, params, tags, the artifact's content hash and the command that rebuilds it; model
    files are logged after the search, for the trials worth keeping (:func:`store_front_models`).

    Screening prunes (``optuna.TrialPruned``) a trial whose first ``screen_windows`` windows already fail a gate by more
    than ``prune_margin`` (relative), before the timed runs and the model logging. A trial whose parameters an earlier
    finished trial already had reuses that result instead of measuring the same artifact again.
    """

    source: SourceModel
    backends: Sequence[str]
    target: str
    study_name: str
    goals: Sequence[tuple[str, str]]
    gates: Gates
    evaluator: Evaluator
    calibration: TextSlice
    screen_windows: int = 0
    prune_margin: float = 0.02
    model_spec: str = ""
    calibration_path: str | None = None
    order: PrecisionOrder | None = None

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        trial.set_user_attr("owner", procs.owner_tag())  # a search on this host can tell when this process is gone
        backend, precision, options = suggest(trial, self.backends)
        for key, value in (("backend", backend), ("precision", precision), ("options", options)):
            trial.set_user_attr(key, value)
        self._record_bits(trial)
        twin = earlier_twin(trial.study, trial)
        if twin is not None:
            return self._reuse(trial, twin)
        claim(trial)
        tags = {**run_tags(self.target, self.study_name, "candidate", [backend]),
                "mlflow_edge.trial": str(trial.number), "optuna.study": self.study_name}
        try:
            with tracked_run(f"trial-{trial.number}-{precision}", nested=True, tags=tags,
                             stopped_early=(optuna.TrialPruned,)) as run:
                trial.set_user_attr("run_id", run.info.run_id)
                base = convert(self.source, backend)
                artifact = quantize(self.source, base, precision, options, self.calibration)
                mlflow.set_tag(REBUILD_TAG, rebuild_command(self.model_spec or str(self.source.path), backend,
                                                            precision, options, self.calibration_path))
                try:
                    known = self._known_accuracy(run, artifact)
                    self._screen(trial, artifact, known)
                    metrics = evaluate_candidate(self.evaluator, artifact, self.gates, self.target,
                                                 self.study_name, base=base, log_model=False,
                                                 known_accuracy=known)["metrics"]
                    log_prediction(trial, metrics)
                finally:  # measured: the cache's size limit may evict it (the front's are rebuilt to be logged)
                    if (entry := cache.entry_of(artifact.path)) is not None:
                        cache.release(entry)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", (reason.splitlines() or [""])[0][:1000])
            progress(f"trial {trial.number} ({backend} {precision}) failed: {reason}")
            raise
        trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
        self._constrain(trial, metrics)
        return tuple(float(metrics.get(m, math.nan)) for m, _ in self.goals)

    def screenable(self) -> bool:
        """Whether some gate group can be decided from accuracy and size alone."""
        return self.screen_windows > 0 and any(
            all(g.metric in ACCURACY_SIZE_METRICS for g in group.gates) for group in self.gates.groups)

    def _known_accuracy(self, run: mlflow.ActiveRun, artifact) -> dict[str, float] | None:
        """The accuracy another run measured for this very artifact (any study of the experiment, any machine), so
        that this trial only measures speed; the run says where its accuracy came from."""
        found = earlier_accuracy(run.info.experiment_id, content_digest(artifact), self.evaluator.accuracy_key())
        if found is None:
            return None
        mlflow.set_tag(ACCURACY_FROM_TAG, found[0])
        progress(f"{artifact.backend} {artifact.precision}: accuracy measured in run {found[0]} is reused; "
                 "measuring speed only")
        return found[1]

    def _screen(self, trial: optuna.Trial, artifact, known: dict[str, float] | None = None) -> None:
        if not (self.screenable() or known):
            return
        early = known or self.evaluator.screen(artifact, self.screen_windows)
        failed = self.gates.certain_failures(early, 0.0 if known else self.prune_margin)
        if not failed:
            return
        windows = min(self.screen_windows, self.evaluator.settings.windows)
        reason = ("pruned on the accuracy measured earlier: " if known else
                  f"pruned after {windows} of {self.evaluator.settings.windows} windows: ")
        reason += "; ".join(f"{g.group} fails even at best "
                            f"({', '.join(f'{r.gate.metric}={r.value:.4g}' for r in g.results)})" for g in failed)
        mlflow.log_metrics({f"screen.{k}": v for k, v in early.items()})
        log_prediction(trial, early)
        trial.set_user_attr("screen", {k: float(v) for k, v in early.items()})
        self._constrain(trial, early)
        progress(f"trial {trial.number} ({artifact.precision}) {reason}")
        raise optuna.TrialPruned(reason)

    def _record_bits(self, trial: optuna.Trial) -> None:
        """The trial's bits and method (:data:`BITS_ATTR`) and the mean KLD the order of precision predicts for it."""
        if self.order is None:
            return
        config = self.order.configuration_of(trial.params)
        if config is None or config.bits is None:
            return
        trial.set_user_attr(BITS_ATTR, {"method": config.bits.method, "bpw": config.bits.bpw})
        others = [t for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number]
        predicted, estimated = self.order.predict(config, others), self.order.estimated(config)
        if predicted is not None:
            trial.set_user_attr(PREDICTED_ATTR, predicted)
        if estimated is not None:
            trial.set_user_attr(ESTIMATED_ATTR, estimated)

    def _constrain(self, trial: optuna.Trial, metrics: dict[str, float]) -> None:
        violations = self.gates.violations(metrics)
        trial.set_user_attr("constraints", violations)
        for key, value in violations.items():
            trial.set_constraint(key, value)

    def _reuse(self, trial: optuna.Trial, twin: FrozenTrial) -> tuple[float, ...]:
        trial.set_user_attr("twin_of", twin.number)
        for key in ("run_id", "metrics", "screen"):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        for key, value in twin.constraints.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("constraints", dict(twin.constraints))
        if twin.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"same parameters as pruned trial {twin.number}")
        progress(f"trial {trial.number} has the parameters of trial {twin.number}: its result is reused")
        return tuple(twin.values)


def log_prediction(trial: optuna.Trial, metrics: dict[str, float]) -> None:
    """On the active run: the bits, the mean KLD predicted before the trial and the prediction's error (the log of
    measured over predicted), and the backend's own sensitivity estimate where there was one."""
    bits, predicted = trial.user_attrs.get(BITS_ATTR), trial.user_attrs.get(PREDICTED_ATTR)
    kld = metrics.get("kld_mean")
    if bits:
        mlflow.set_tags({"mlflow_edge.bits.method": bits["method"]})
        mlflow.log_metric("search.nominal_bpw", bits["bpw"])
    if predicted and kld and kld > 0:
        mlflow.log_metrics({"search.predicted_kld_mean": predicted,
                            "search.kld_prediction_error": math.log(kld / predicted)})
    if estimated := trial.user_attrs.get(ESTIMATED_ATTR):
        mlflow.log_metric("search.estimated_kld_mean", estimated)  # the backend's own, before scaling


def run_search(model: str, target: str = "cpu", trials: int = 8, timeout: float | None = None,
               objectives: str = "multi", gates: str | Sequence[str] | Gates | None = None,
               policy: str = "min:size_mb", seed: int = 0, storage: str | None = None, study_name: str | None = None,
               registered_model: str | None = None, settings: EvalSettings | None = None,
               calibration_path: str | None = None, experiment: str | None = None, accuracy_only: bool = False,
               screen_windows: int | None = None, prune_margin: float = 0.02,
               run_name: str = "search", backends: Sequence[str] | None = None, fidelity: str | None = None,
               gate_confidence: float | None = None, coordinate_only: bool | None = None) -> dict[str, Any]:
    """Search the target's installed backends with Optuna for ``trials`` trials (or ``timeout`` seconds), log every
    trial as a nested MLflow run, the Pareto front on the parent, and promote the best feasible one by ``policy``.

    ``accuracy_only`` is the explicit mode for a target whose hardware this machine lacks: nothing is timed, the
    objectives, gates and policy use accuracy and size alone (gates on other metrics are dropped and listed).
    ``backends`` narrows the search to some of the target's installed backends.
    ``screen_windows`` (default: a quarter of the evaluation windows; 0 disables) is the cheap first slice that can
    prune a trial before its timed runs. ``fidelity`` names a preset for the fidelity gates
    (:data:`~mlflow_edge.gates.FIDELITY_PRESETS`); ``gate_confidence`` decides gates on the bounds of that confidence
    level instead of the point values. Every trial measures a configuration no earlier trial measured; the search stops
    early when none is left. Model files are logged for the feasible front and the policy's best only.
    ``coordinate_only`` runs no trial here: workers (:func:`run_worker`) on the target's hardware measure them, and
    this process says who works until the budget is measured (a ``timeout`` with no worker is an error). It is the
    default when this machine cannot measure the target and a shared ``storage`` is given. Returns
    ``{"study", "storage", "run_id", "trials", "new_trials", "pareto", "promotion", "distinct_left",
    "bytes_logged"}``.
    """
    target_spec = get_target(target)
    if (trials is None or trials < 1) and timeout is None:
        raise EdgeError(f"a budget of 0: give trials >= 1 or a timeout (got trials={trials})")
    if timeout is not None and timeout <= 0:
        raise EdgeError(f"a budget of 0: the timeout must be positive (got {timeout})")
    measurable = accuracy_only or is_measurable(target_spec)
    coordinate_only = (not measurable and storage is not None) if coordinate_only is None else coordinate_only
    if not measurable and not coordinate_only:
        raise EdgeError(f"target '{target}' needs {target_spec.requires}, which this machine lacks, so latency cannot "
                        "be measured here; rerun with --accuracy-only true to search by accuracy and size alone, or "
                        "give a shared --storage and start `search --worker` on that hardware")
    if coordinate_only and storage is None:
        raise EdgeError("--coordinate-only needs a shared --storage that the workers reach "
                        "(e.g. postgresql://user@host/optuna)")
    gate_spec = resolve_gates(gates, fidelity, gate_confidence)
    dropped: list[str] = []
    if accuracy_only:
        _refuse_unmeasured_gates(gate_spec if gates is not None else None)
        gate_spec, dropped = gate_spec.restricted_to(ACCURACY_SIZE_METRICS)
        if gate_spec is None:
            raise EdgeError(f"no gate can be checked in the accuracy/size-only mode (dropped {', '.join(dropped)}); "
                            "give an accuracy or size gate such as accuracy_retention>=0.95")
    promotion_policy = registry.parse_policy(policy)
    if accuracy_only and not set(promotion_policy.metrics) <= set(ACCURACY_SIZE_METRICS):
        raise EdgeError(f"policy '{policy}' needs metrics the accuracy/size-only mode does not measure")
    goals = parse_objectives(objectives, accuracy_only)
    chosen_backends, backends = backends, _chosen_backends(target, backends)
    if not backends:
        raise EdgeError(f"no installed backend for target '{target}' (it recommends "
                        f"{', '.join(target_spec.primary + target_spec.secondary)})")
    settings = settings or EvalSettings()
    if gate_confidence is not None:
        settings = dataclasses.replace(settings, confidence=gate_confidence)
    if accuracy_only:
        settings = dataclasses.replace(settings, speed=False)
    if screen_windows is None:
        screen_windows = settings.windows // 4
    if screen_windows < 0 or prune_margin < 0:
        raise EdgeError("screen_windows and prune_margin must not be negative")
    calibration = calibration_text(calibration_path)
    check_disjoint(settings.text, calibration)
    storage_url = storage or default_storage()
    storage_label = redacted(storage_url)
    optuna_storage = open_storage(storage_url)

    with tracked_run(run_name, experiment, tags=run_tags(target, "search", "study", backends)) as parent:
        source = resolve_source(model)
        backends, unsupported = backends_for_model(backends, source)
        for backend, reason in unsupported.items():
            progress(f"leaving out {backend}: {reason}")
        if not backends:
            raise EdgeError(f"no backend for target '{target}' can convert {source.name}: "
                            + "; ".join(unsupported.values()))
        plan = planned(source, backends, settings.window, settings.reference_dtype, chosen=chosen_backends is not None)
        for note in plan.notes:
            progress(note)
        backends, settings = plan.backends, dataclasses.replace(settings, reference_dtype=plan.reference_dtype)
        log_new_params(dict(plan.params))
        name = study_name or f"{source.name}-{target}"
        mlflow.MlflowClient().update_run(parent.info.run_id, name=name)  # a readable parent: the study's name
        mlflow.set_tags({"mlflow_edge.study": name, "optuna.study": name, "optuna.storage": storage_label,
                         "mlflow_edge.measured": "accuracy,size" if accuracy_only else "all"})
        if dropped:
            mlflow.set_tag("gates.dropped", ",".join(dropped))
            progress(f"accuracy/size-only mode: gates {', '.join(dropped)} cannot be checked here and are dropped")
        log_new_params({"model": model, "source": source.name, "source.sha256": source.sha256, "target": target,
                        "backends": ",".join(backends), "trials": trials, "timeout": timeout,
                        "objectives": ",".join(f"{d[:3]}:{m}" for m, d in goals), "gates": str(gate_spec),
                        "policy": policy, "seed": seed, "study": name, "accuracy_only": accuracy_only,
                        "screen_windows": screen_windows, "prune_margin": prune_margin, "fidelity": fidelity,
                        "gate_confidence": gate_confidence, **settings.params()})
        for backend in backends:  # convert once per (source, backend); every trial reuses it from the cache
            base = convert(source, backend)
            progress(f"base {backend} {base.precision}: {base.size_bytes / 1e6:.1f} MB")
        study = open_study(optuna_storage, name, goals, objectives, storage_label)
        before = len(study.trials)  # the retries of stale trials below are new trials of this call
        stale = fail_stale_trials(study)
        if stale:
            progress(f"marked trial(s) {', '.join(map(str, stale))} FAIL: left RUNNING by a stopped search; their "
                     "configurations are queued again")
        space = enumerate_space(backends)
        order = precision_order(space, backends, source, gate_spec, calibration)
        study.sampler = _sampler(space, seed + before, trials, order)
        if before == 0:  # a new study: the backends' usual defaults (or the gates' bits) first, as the budget allows
            for point in gated_starting_points(starting_points(backends), order, gate_spec)[:trials]:
                study.enqueue_trial(point, skip_if_exists=True)
        study.set_user_attr(COORDINATION_ATTR, {
            "version": __version__, "space": space_digest(space, backends), "parent_run_id": parent.info.run_id,
            "experiment_id": parent.info.experiment_id, "model": model, "target": target, "backends": list(backends),
            "gates": str(gate_spec), "objectives": objectives, "settings": settings_record(settings),
            "calibration": calibration_path, "screen_windows": screen_windows, "prune_margin": prune_margin,
            "budget": trials})
        done = measured_count(study)
        remaining = _runnable(study, space, max(trials - done, 0) if trials and trials >= 1 else None)
        progress(f"study {name}: {done} trial(s) done, {remaining if remaining is not None else 'unbounded'} to run "
                 f"over {', '.join(backends)}")

        here = settings if measurable else dataclasses.replace(settings, speed=False)  # no speed without hardware
        objective = Objective(source, backends, target, name, goals, gate_spec, Evaluator(source, here),
                              calibration, screen_windows, prune_margin, model_spec=model,
                              calibration_path=calibration_path, order=order)
        runner = DeviceWorkers(name, target, storage_label, timeout) if coordinate_only else None
        try:
            if remaining != 0:  # a study with nothing left to run measures nothing again
                evaluate_reference(objective.evaluator, target, name)
                study.set_user_attr(REFERENCE_ATTR, objective.evaluator.reference_metrics)
                _run_trials(study, objective, trials, timeout, space, runner)
            finish_study(study, objective, trials, timeout, space, runner)
            bytes_logged = store_front_models(study, objective, promotion_policy)
        finally:
            objective.evaluator.close()
        mlflow.log_metric("bytes_logged", bytes_logged)
        table = pareto_table(study, goals)
        counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in DONE_STATES}
        mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
        progress(f"Pareto front: {len(table)} feasible trial(s) of {len(study.trials)} "
                 f"({', '.join(f'{v} {k}' for k, v in counts.items())}); {bytes_logged / 1e6:.1f} MB of models logged")
        promotion = None
        try:
            promotion = promote_study(parent, name, source, target, gate_spec, promotion_policy, registered_model)
        finally:  # the report stands whether or not a champion came out of it
            promoted = promotion is not None and not promotion.kept_champion
            _log_search_report(study, goals, promotion.run_id if promoted else None)
        left = None if space is None else len(unmeasured(space, study.get_trials(deepcopy=False)))
        return {"study": name, "storage": storage_label, "run_id": parent.info.run_id, "trials": len(study.trials),
                "new_trials": len(study.trials) - before, "pareto": table.to_dict("records"),
                "promotion": promotion.describe(), "distinct_left": left, "bytes_logged": bytes_logged}


def run_worker(storage: str, study_name: str, target: str | None = None, timeout: float | None = None,
               wait_s: float = 600.0) -> dict[str, Any]:
    """Join the study ``study_name`` that a coordinator (``mlflow-edge search`` on the same storage) started, and run
    its trials until the study's budget is measured: the coordinator's settings, gates, space and budget. Its trials
    are nested under one run per worker (role ``worker``), itself under the coordinator's parent run. No reference
    run, no promotion: the coordinator does those once per study.

    Refused, in one line: a storage that does not answer, a study that no coordinator starts within ``wait_s``, a
    study of another target than ``target``, another mlflow-edge version or search space, another evaluation text.
    """
    label = redacted(storage)
    study = _wait_for_study(open_storage(storage), study_name, label, wait_s)
    record = study.user_attrs[COORDINATION_ATTR]
    _check_joinable(record, study_name, target)
    settings = settings_from_record(record["settings"])
    _check_measurable(record, study_name, settings.speed)
    experiment = mlflow.get_experiment(record["experiment_id"]).name
    tags = {**run_tags(record["target"], study_name, "worker", record["backends"]),
            "mlflow.parentRunId": record["parent_run_id"], "optuna.study": study_name}
    before = {t.number for t in study.get_trials(deepcopy=False)}
    register_worker(study, record["target"])
    with tracked_run(f"worker-{procs.owner_tag()}", experiment, tags=tags):
        _work_on(study, record, study_name, settings, timeout, wait_s, label)
    mine = [t.number for t in study.get_trials(deepcopy=False)
            if t.number not in before and t.user_attrs.get("owner") == procs.owner_tag()]
    return {"study": study_name, "storage": label, "trials": mine}


def _work_on(study: optuna.Study, record: dict[str, Any], study_name: str, settings: EvalSettings,
             timeout: float | None, wait_s: float, label: str) -> None:
    """A worker's trials of ``study`` with the coordinator's ``record``, nested under the active worker run."""
    source = resolve_source(record["model"])
    space = enumerate_space(record["backends"])
    gates, calibration = parse_gates(record["gates"]), calibration_text(record["calibration"])
    order = precision_order(space, record["backends"], source, gates, calibration)
    study.sampler = _sampler(space, os.getpid() + len(study.trials), record["budget"], order)
    goals = parse_objectives(record["objectives"], accuracy_only=not settings.speed)
    objective = Objective(source, record["backends"], record["target"], study_name, goals, gates,
                          Evaluator(source, settings), calibration, record["screen_windows"],
                          record["prune_margin"], model_spec=record["model"],
                          calibration_path=record["calibration"], order=order)
    try:
        _adopt_reference(study, objective.evaluator, wait_s)
        progress(f"worker of study {study_name} ({label}): {measured_count(study)} of {record['budget']} trial(s) "
                 "measured so far")
        _optimize(study, objective, record["budget"], timeout, space)
    finally:
        objective.evaluator.close()


def _wait_for_study(storage: optuna.storages.BaseStorage, name: str, label: str, wait_s: float) -> optuna.Study:
    """The study ``name`` once a coordinator recorded how to join it, waiting at most ``wait_s`` (saying so)."""
    deadline, said = time.monotonic() + wait_s, 0.0
    while True:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            if COORDINATION_ATTR in study.user_attrs:
                return study
        except KeyError:  # no such study yet
            pass
        if time.monotonic() > deadline:
            raise EdgeError(f"no coordinator started study '{name}' in {label} within {wait_s:.0f} s "
                            "(start `mlflow-edge search` with the same --storage and --study-name)")
        if time.monotonic() - said > 30:
            progress(f"waiting for a coordinator to start study '{name}' in {label}")
            said = time.monotonic()
        time.sleep(2.0)


def _check_joinable(record: dict[str, Any], name: str, target: str | None) -> None:
    """Refuse a study this worker would measure differently: another target, mlflow-edge version or search space."""
    if target is not None and target != record["target"]:
        raise EdgeError(f"study '{name}' searches target '{record['target']}'; this worker was started for "
                        f"'{target}' (use that target's study)")
    if record["version"] != __version__:
        raise EdgeError(f"study '{name}' was started by mlflow-edge {record['version']}; this worker runs "
                        f"{__version__}: install the same version to join")
    missing = [b for b in record["backends"] if b not in backends_for(record["target"])]
    if missing:
        raise EdgeError(f"study '{name}' searches {', '.join(record['backends'])}; {', '.join(missing)} is not "
                        "installed here")
    digest = space_digest(enumerate_space(record["backends"]), record["backends"])
    if digest != record["space"]:
        raise EdgeError(f"study '{name}' has search space {record['space']}; this worker's is {digest} (another "
                        "version of a backend or its framework): install the same versions to join")


def _check_measurable(record: dict[str, Any], name: str, speed: bool) -> None:
    """Refuse a study that times its target on a machine that lacks the target's hardware."""
    if speed and not is_measurable(record["target"]):
        raise EdgeError(f"study '{name}' measures speed on target '{record['target']}', which needs "
                        f"{get_target(record['target']).requires}; this machine lacks it: join from one that has it")


def _adopt_reference(study: optuna.Study, evaluator: Evaluator, wait_s: float) -> None:
    """The coordinator's reference metrics when its cached log-probabilities are on this machine (same host or a
    shared cache) and it timed the reference, else the reference measured here (no run: the coordinator's reference
    run is the study's; the speed ratios of this worker's trials are against this machine's reference)."""
    deadline = time.monotonic() + wait_s
    while REFERENCE_ATTR not in study.user_attrs and time.monotonic() < deadline:  # read from the storage each time
        time.sleep(2.0)
    recorded = study.user_attrs.get(REFERENCE_ATTR)
    timed = "decode_tok_s" in (recorded or {}) or not evaluator.settings.speed  # a coordinator without the hardware
    if recorded and timed and (evaluator.reference_dir / "logprobs.npy").is_file():
        evaluator.reference_metrics = dict(recorded)
    else:
        progress("measuring the reference on this machine (its log-probabilities are not cached here)")
        evaluator.evaluate_reference()


def _sampler(space: list[dict[str, Any]] | None, seed: int, trials: int | None,
             order: PrecisionOrder | None = None) -> optuna.samplers.BaseSampler:
    """TPE kept to unmeasured configurations (when the space can be listed), in the order of precision. A resumed
    study draws on from where it stopped (``seed`` counts its trials) instead of replaying the first call's random
    start-up trials; a small budget keeps TPE's random start-up short enough to leave it trials to learn from."""
    startup = min(10, max(2, (trials or 10) // 2))
    tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return tpe if space is None else DistinctSampler(tpe, space, seed, order)


def precision_order(space: list[dict[str, Any]] | None, backends: Sequence[str], source: SourceModel,
                    gates: Gates, calibration: TextSlice) -> PrecisionOrder | None:
    """The space's configurations with their bits and the backends' own sensitivity estimates (``None`` when the
    space cannot be listed)."""
    if space is None:
        return None
    return PrecisionOrder.of(space, backends, source, gates, SensitivityEstimate(source, calibration))


def _log_search_report(study: optuna.Study, goals: Sequence[tuple[str, str]], champion_run_id: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_search_report(study, goals, Path(tmp), champion_run_id)
        mlflow.log_artifacts(tmp, artifact_path="search")


def _refuse_unmeasured_gates(given: Gates | None) -> None:
    """A gate group the user gave whose every metric the accuracy/size-only mode leaves unmeasured is an error (an
    OR alternative that is measured keeps its group; the default gates are narrowed without a word)."""
    for group in given.groups if given is not None else ():
        if not any(gate.metric in ACCURACY_SIZE_METRICS for gate in group.gates):
            raise EdgeError(f"gate {group} is not measured in the accuracy/size-only mode; gate on accuracy or size "
                            "metrics such as accuracy_retention, kld_mean, size_mb or compression_ratio")


def _optimize(study: optuna.Study, objective: Objective, budget: int | None, timeout: float | None,
              space: list[dict[str, Any]] | None) -> None:
    """Run trials of ``objective`` until the study holds ``budget`` measured trials (counting those every worker
    runs), the space is exhausted, or ``timeout``."""
    if budget is not None and measured_count(study, running=True) >= budget:
        return
    study.optimize(objective, n_trials=None, timeout=timeout, catch=(Exception,),
                   callbacks=[StopWhenDone(budget, space), TimeLeft(budget, timeout)])


def _run_trials(study: optuna.Study, objective: Objective, budget: int | None, timeout: float | None,
                space: list[dict[str, Any]] | None, device_workers: "DeviceWorkers | None") -> None:
    """Run trials here, or, for a coordinator without the target's hardware, wait for the workers that have it."""
    if device_workers is None:
        _optimize(study, objective, budget, timeout, space)
    else:
        device_workers.wait(study, budget, space)


def finish_study(study: optuna.Study, objective: Objective, budget: int | None, timeout: float | None,
                 space: list[dict[str, Any]] | None, device_workers: "DeviceWorkers | None" = None) -> None:
    """Wait for the other workers' trials, then run what their deaths queued again (or wait for ``device_workers``
    to), until nothing of the budget is running or queued: what the coordinator does before the study's models are
    stored and its champion promoted."""
    while True:
        wait_for_workers(study)
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not queued or (budget is not None and measured_count(study) >= budget):
            return
        progress(f"{len(queued)} trial(s) queued again after their worker stopped")
        _run_trials(study, objective, budget, timeout, space, device_workers)


WORKER_ATTR_PREFIX = "mlflow_edge.worker:"
"""Study attribute of each worker that joined (``<prefix><owner>``): its target, host, CPU and accelerator."""


def register_worker(study: optuna.Study, target: str) -> None:
    """Record in the study that this process works on it, so that the coordinator can say who does."""
    fingerprint = hardware_fingerprint()
    study.set_user_attr(WORKER_ATTR_PREFIX + procs.owner_tag(), {
        "target": target, "cpu": fingerprint["hw.cpu_model"], "accelerator": fingerprint["hw.accelerator"],
        "joined": time.time()})


def joined_workers(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The workers that joined ``study`` (read from the storage), by owner tag."""
    return {key.removeprefix(WORKER_ATTR_PREFIX): value for key, value in study.user_attrs.items()
            if key.startswith(WORKER_ATTR_PREFIX)}


@dataclasses.dataclass
class DeviceWorkers:
    """A coordinator that runs no trial: it waits for the workers on the target's hardware, says who works (or that
    none has joined, and how to start one) when a worker joins and every ``status_s``, and gives up after ``timeout``
    when no trial was measured: a target with no worker is never skipped silently."""

    study_name: str
    target: str
    storage_label: str
    timeout: float | None
    status_s: float = 30.0
    poll_s: float = 2.0

    def wait(self, study: optuna.Study, budget: int | None, space: list[dict[str, Any]] | None) -> None:
        started, said, known = time.monotonic(), -math.inf, set()
        while not _budget_measured(study, budget, space):
            workers = set(joined_workers(study))
            if time.monotonic() - said >= self.status_s or workers != known:  # and whenever a worker joins
                progress(self.status(study, budget))
                said, known = time.monotonic(), workers
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                self._out_of_time(study)
                return
            time.sleep(self.poll_s)
            fail_stale_trials(study)

    def status(self, study: optuna.Study, budget: int | None) -> str:
        workers = joined_workers(study)
        done = f"{measured_count(study)} of {budget if budget is not None else 'unbounded'} trial(s) measured"
        if not workers:
            return (f"study {self.study_name}: {done}; no worker for target '{self.target}' has joined yet: on a "
                    f"machine with {get_target(self.target).requires} run `mlflow-edge search --worker --storage "
                    f"{self.storage_label} --study-name {self.study_name} --target {self.target}`")
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return (f"study {self.study_name}: {done}, {len(running)} running; workers: "
                + ", ".join(f"{owner} ({w['cpu']}; {w['accelerator']})" for owner, w in workers.items()))

    def _out_of_time(self, study: optuna.Study) -> None:
        if measured_count(study) == 0:
            raise EdgeError(f"no worker for target '{self.target}' measured a trial of study '{self.study_name}' "
                            f"within {self.timeout:.0f} s; start `mlflow-edge search --worker` on a machine with "
                            f"{get_target(self.target).requires}; nothing promoted")
        progress(f"time budget spent: the study goes on with its {measured_count(study)} measured trial(s)")


def _budget_measured(study: optuna.Study, budget: int | None, space: list[dict[str, Any]] | None) -> bool:
    """Whether nothing more of the budget is to be measured: the budget is, or no configuration is left and no
    trial runs."""
    if budget is not None and measured_count(study) >= budget:
        return True
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    return not running and _runnable(study, space, None, quiet=True) == 0


@dataclasses.dataclass
class StopWhenDone:
    """Optuna callback: stop this process's loop once the study's measured trials reach ``budget`` (trials running
    in other workers count) or no configuration of ``space`` is left; and, as a guard against trials that fail
    before they measure anything (and so never count), after twice the budget of this process's own trials."""

    budget: int | None
    space: list[dict[str, Any]] | None
    finished: int = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.finished += 1
        if self.budget is not None and (measured_count(study, running=True) >= self.budget
                                        or self.finished >= 2 * self.budget):
            study.stop()
        elif _runnable(study, self.space, None, quiet=True) == 0:
            study.stop()


@dataclasses.dataclass
class TimeLeft:
    """Optuna callback: after each trial, an estimate of the search's remaining time (the median wall time of this
    process's trials so far, times the trials left of the budget), and, with a ``timeout``, no trial started that
    the median says would end past it: the timeout holds within about one trial, not a trial late."""

    budget: int | None
    timeout: float | None
    started: float = dataclasses.field(default_factory=time.monotonic)
    durations: list[float] = dataclasses.field(default_factory=list)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.datetime_start is None or trial.datetime_complete is None:
            return
        self.durations.append((trial.datetime_complete - trial.datetime_start).total_seconds())
        typical = sorted(self.durations)[len(self.durations) // 2]
        elapsed = time.monotonic() - self.started
        left = None if self.budget is None else max(self.budget - measured_count(study, running=True), 0)
        if left:
            until = f"; the timeout ends it in {self.timeout - elapsed:.0f} s" if self.timeout else ""
            progress(f"{self.budget - left} of {self.budget} trial(s) measured; about {left * typical / 60:.1f} min "
                     f"left at {typical:.0f} s a trial{until}")
        if self.timeout is not None and left != 0 and elapsed + typical > self.timeout:
            progress(f"time budget: a trial takes about {typical:.0f} s and {self.timeout - elapsed:.0f} s are left "
                     "of the timeout, so no further trial starts")
            study.stop()


def measured_count(study: optuna.Study, running: bool = False) -> int:
    """Trials of the study that count against its budget: measured or failed for a reason of their own (a trial a
    stopped process left behind is not), and with ``running``, those being measured now."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) + ((TrialState.RUNNING,) if running else ())
    return sum(counts_as_measured(t) for t in study.get_trials(deepcopy=False, states=states))


def _runnable(study: optuna.Study, space: list[dict[str, Any]] | None, wanted: int | None,
              quiet: bool = False) -> int | None:
    """``wanted`` trials (``None``: unbounded), at most what is left to run: the unmeasured configurations of
    ``space`` and the queued trials; says so when that is the limit."""
    if space is None:
        return wanted
    trials = study.get_trials(deepcopy=False)
    left = len(unmeasured(space, trials)) + sum(t.state == TrialState.WAITING for t in trials)
    if wanted is not None and wanted <= left:
        return wanted
    if not quiet:
        progress(f"only {left} of the {len(space)} configurations are not measured yet: the search stops after them")
    return left


def wait_for_workers(study: optuna.Study, poll_s: float = 2.0) -> None:
    """Wait until no trial of the study is running in another worker (a dead worker's trials turn stale after the
    heartbeat's grace period and are failed, and queued again, here)."""
    last_said = 0.0
    while running := study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if time.monotonic() - last_said > 30:
            progress(f"waiting for {len(running)} trial(s) of other workers: "
                     + ", ".join(f"#{t.number} ({t.user_attrs.get('owner', '?')})" for t in running))
            last_said = time.monotonic()
        time.sleep(poll_s)
        fail_stale_trials(study)


def _chosen_backends(target: str, chosen: Sequence[str] | None) -> tuple[str, ...]:
    installed = backends_for(target)
    if not chosen:
        return installed
    if unknown := [b for b in chosen if b not in installed]:
        raise EdgeError(f"backend(s) {', '.join(unknown)} cannot search target '{target}' here "
                        f"(installed for it: {', '.join(installed) or 'none'})")
    return tuple(dict.fromkeys(chosen))


def starting_points(backends: Sequence[str]) -> list[dict[str, Any]]:
    """Every backend's defaults as full trial parameters (``backend`` first), tried first by a new study: each
    backend's first default, then each one's second … (a small budget reaches every backend)."""
    defaults = [[{"backend": name, **point} for point in get_backend(name).starting_points()] for name in backends]
    return [points[rank] for rank in range(max(map(len, defaults), default=0))
            for points in defaults if rank < len(points)]


def redacted(storage_url: str) -> str:
    """``storage_url`` with its password shown as ``***``: what tags, params and messages may hold."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage_url).render_as_string(hide_password=True)
    except ArgumentError:
        raise EdgeError("the Optuna storage is not a database URL (e.g. sqlite:///optuna.db)") from None


def open_storage(storage_url: str) -> optuna.storages.BaseStorage:
    """Connect to the Optuna RDB storage once, waiting at most :data:`CONNECT_TIMEOUT_S` for a server; a missing
    driver or an unreachable server is a one-line error that never shows the password."""
    from sqlalchemy.engine import make_url

    label, url = redacted(storage_url), make_url(storage_url)
    try:
        beat = heartbeat_interval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(storage_url, engine_kwargs=_connect_kwargs(url),
                                              heartbeat_interval=beat, grace_period=4 * beat,
                                              heartbeat_stale_trial_callback=on_stale_trial)
    except Exception as exc:  # driver import, connection and schema errors come in many classes
        cause = f" ({first_line(exc.__cause__)})" if isinstance(exc, ImportError) and exc.__cause__ else ""
        reason = first_line(exc) + cause
        if url.password:
            reason = reason.replace(str(url.password), "***")
        raise EdgeError(f"cannot open the Optuna storage {label}: {reason}") from None


def _connect_kwargs(url: Any) -> dict[str, Any]:
    """SQLAlchemy engine arguments that bound the wait for a database server, for drivers that take one."""
    try:
        driver = url.get_driver_name()
    except Exception:  # an unknown dialect: RDBStorage names it
        return {}
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if driver in _CONNECT_TIMEOUT_DRIVERS else {}


def open_study(storage: str | optuna.storages.BaseStorage, name: str, goals: Sequence[tuple[str, str]],
               objectives: str, storage_label: str | None = None) -> optuna.Study:
    """Create the study ``name`` in ``storage``, or load it when it exists with the same objectives
    (``storage_label``: how messages name the storage, without its password)."""
    label = storage_label or (redacted(storage) if isinstance(storage, str) else type(storage).__name__)
    try:
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                    directions=[d for _, d in goals])
    except ValueError as exc:
        raise EdgeError(f"cannot open Optuna study '{name}' in {label}: {exc}".splitlines()[0]) from None
    if [d.name.lower() for d in study.directions] != [d for _, d in goals] or (
            study.metric_names not in (None, [m for m, _ in goals])):
        raise EdgeError(f"Optuna study '{name}' has other objectives than '{objectives}'; use another study name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([m for m, _ in goals])
    return study
