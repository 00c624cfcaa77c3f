"""Who runs a study's trials, and until when. This process (:func:`run_trials`), a worker that joined the study a
coordinator started on a shared storage (:func:`run_worker`), or, for a coordinator without the target's hardware,
the workers on it (:class:`DeviceWorkers`); each stops once the study's measured trials reach the budget, counting
every worker's (:class:`StopWhenDone`, :class:`TimeLeft`)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Sequence

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState

from mlflow_edge import __version__, procs
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import TextSlice
from mlflow_edge.evaluation.harness import Evaluator, settings_from_record
from mlflow_edge.gates import Gates
from mlflow_edge.runs import progress, run_tags, tracked_run
from mlflow_edge.search.config import ResolvedSearch, SearchConfig
from mlflow_edge.search.objective import Objective
from mlflow_edge.search.precision import PrecisionOrder, SensitivityEstimate
from mlflow_edge.search.space import (
    DistinctSampler,
    backends_for,
    counts_as_measured,
    enumerate_space,
    space_digest,
    unmeasured,
)
from mlflow_edge.search.storage import fail_stale_trials, open_storage, redacted
from mlflow_edge.sources import SourceModel, resolve_source
from mlflow_edge.targets import get_target, hardware_fingerprint, is_measurable

COORDINATION_ATTR = "mlflow_edge"
"""Study user attribute: what workers need to join (version, space digest, parent run, settings, gates, budget)."""
REFERENCE_ATTR = "mlflow_edge.reference"
"""Study user attribute: the reference's metrics as the coordinator measured them."""


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
    _check_measurable(record, study_name, settings_from_record(record["settings"]).speed)
    search = worker_config(record, storage, study_name, timeout).resolved()
    experiment = mlflow.get_experiment(record["experiment_id"]).name
    tags = {**run_tags(record["target"], study_name, "worker", record["backends"]),
            "mlflow.parentRunId": record["parent_run_id"], "optuna.study": study_name}
    before = {t.number for t in study.get_trials(deepcopy=False)}
    register_worker(study, record["target"])
    with tracked_run(f"worker-{procs.owner_tag()}", experiment, tags=tags):
        _work_on(study, search, timeout, wait_s, label)
    mine = [t.number for t in study.get_trials(deepcopy=False)
            if t.number not in before and t.user_attrs.get("owner") == procs.owner_tag()]
    return {"study": study_name, "storage": label, "trials": mine}


def worker_config(record: dict[str, Any], storage: str, study_name: str, timeout: float | None) -> SearchConfig:
    """The coordinator's search as its study's coordination ``record`` holds it, for a worker: the same model,
    target, backends, gates (as resolved there), objectives, settings, calibration text, screening and budget."""
    settings = settings_from_record(record["settings"])
    return SearchConfig(model=record["model"], target=record["target"], trials=record["budget"], timeout=timeout,
                        objectives=record["objectives"], gates=record["gates"], storage=storage,
                        study_name=study_name, settings=settings, calibration_path=record["calibration"],
                        accuracy_only=not settings.speed, screen_windows=record["screen_windows"],
                        prune_margin=record["prune_margin"], backends=record["backends"], coordinate_only=False)


def _work_on(study: optuna.Study, search: ResolvedSearch, timeout: float | None, wait_s: float, label: str) -> None:
    """A worker's trials of ``study`` under the coordinator's ``search``, nested under the active worker run."""
    config, name = search.config, study.study_name
    source = resolve_source(config.model)
    space = enumerate_space(search.backends)
    order = precision_order(space, search.backends, source, search.gates, search.calibration)
    study.sampler = trial_sampler(space, os.getpid() + len(study.trials), config.trials, order)
    objective = Objective(source, search.backends, config.target, name, search.goals, search.gates,
                          Evaluator(source, search.settings), search.calibration, search.screen_windows,
                          config.prune_margin, model_spec=config.model, calibration_path=config.calibration_path,
                          order=order)
    try:
        _adopt_reference(study, objective.evaluator, wait_s)
        progress(f"worker of study {name} ({label}): {measured_count(study)} of {config.trials} trial(s) "
                 "measured so far")
        _optimize(study, objective, config.trials, timeout, space)
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


def trial_sampler(space: list[dict[str, Any]] | None, seed: int, trials: int | None,
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


def _optimize(study: optuna.Study, objective: Objective, budget: int | None, timeout: float | None,
              space: list[dict[str, Any]] | None) -> None:
    """Run trials of ``objective`` until the study holds ``budget`` measured trials (counting those every worker
    runs), the space is exhausted, or ``timeout``."""
    if budget is not None and measured_count(study, running=True) >= budget:
        return
    study.optimize(objective, n_trials=None, timeout=timeout, catch=(Exception,),
                   callbacks=[StopWhenDone(budget, space), TimeLeft(budget, timeout)])


def run_trials(study: optuna.Study, objective: Objective, budget: int | None, timeout: float | None,
               space: list[dict[str, Any]] | None, device_workers: DeviceWorkers | None) -> None:
    """Run trials here, or, for a coordinator without the target's hardware, wait for the workers that have it."""
    if device_workers is None:
        _optimize(study, objective, budget, timeout, space)
    else:
        device_workers.wait(study, budget, space)


def finish_study(study: optuna.Study, objective: Objective, budget: int | None, timeout: float | None,
                 space: list[dict[str, Any]] | None, device_workers: DeviceWorkers | None = None) -> None:
    """Wait for the other workers' trials, then run what their deaths queued again (or wait for ``device_workers``
    to), until nothing of the budget is running or queued: what the coordinator does before the study's models are
    stored and its champion promoted."""
    while True:
        wait_for_workers(study)
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not queued or (budget is not None and measured_count(study) >= budget):
            return
        progress(f"{len(queued)} trial(s) queued again after their worker stopped")
        run_trials(study, objective, budget, timeout, space, device_workers)


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
    return not running and trials_to_run(study, space, None, quiet=True) == 0


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
        elif trials_to_run(study, self.space, None, quiet=True) == 0:
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


def trials_to_run(study: optuna.Study, space: list[dict[str, Any]] | None, wanted: int | None,
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

