"""One trial of the search (:class:`Objective`): sample a configuration, quantize it, screen its accuracy on a first
slice, measure it fully, log it and score it. A configuration two workers sample at the same moment is measured by
one of them (:func:`claim`); one an earlier trial measured is not measured again (:func:`earlier_twin`)."""

from __future__ import annotations

import dataclasses
import math
import shlex
from typing import Any, Sequence

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState

from mlflow_edge import cache, procs, registry
from mlflow_edge.artifacts import content_digest, convert, quantize
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import TextSlice
from mlflow_edge.evaluation.harness import Evaluator
from mlflow_edge.gates import Gates
from mlflow_edge.metrics import ACCURACY_SIZE_METRICS
from mlflow_edge.runs import ACCURACY_FROM_TAG, earlier_accuracy, evaluate_candidate, progress, run_tags, tracked_run
from mlflow_edge.search.precision import BITS_ATTR, ESTIMATED_ATTR, PREDICTED_ATTR, PrecisionOrder
from mlflow_edge.search.space import suggest
from mlflow_edge.sources import SourceModel

REBUILD_TAG = registry.REBUILD_TAG


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
