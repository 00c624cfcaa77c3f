"""The Optuna RDB storage a study lives in: its URL (default ``optuna.db`` next to the MLflow sqlite store) shown
without its password, one bounded connection, the study opened or resumed with the same objectives, and the trials a
stopped process left RUNNING failed (their MLflow runs too) and queued again."""

from __future__ import annotations

import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState

from mlflow_edge import procs
from mlflow_edge.errors import EdgeError, first_line
from mlflow_edge.runs import end_stale_run, progress

MAX_RETRIES = 2
"""How often a configuration whose worker died is queued again."""
HEARTBEAT_ENV = "MLFLOW_EDGE_TRIAL_HEARTBEAT"
DEFAULT_HEARTBEAT_S = 60
"""Seconds between a running trial's heartbeats in the Optuna storage; a trial silent for four of them is stale."""
CONNECT_TIMEOUT_S = 10
"""How long opening a networked Optuna storage may wait for its server (one attempt, no retries)."""
_SCHEMA_ATTEMPTS = 4  # openings of a new database that may race another process creating its tables
_CONNECT_TIMEOUT_DRIVERS = frozenset({"psycopg", "psycopg2", "pymysql", "mysqldb"})  # take ``connect_timeout``


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
        return _rdb_storage(storage_url, url)
    except Exception as exc:  # driver import, connection and schema errors come in many classes
        cause = f" ({first_line(exc.__cause__)})" if isinstance(exc, ImportError) and exc.__cause__ else ""
        reason = first_line(exc) + cause
        if url.password:
            reason = reason.replace(str(url.password), "***")
        raise EdgeError(f"cannot open the Optuna storage {label}: {reason}") from None


def _rdb_storage(storage_url: str, url: Any) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with this project's heartbeat. Processes that open a new database at the same moment
    all create its tables, and on PostgreSQL all but one fail on a catalog constraint; the tables are there on the
    next try, so a failed creation is tried again, a few times."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    beat = heartbeat_interval()

    def storage() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(storage_url, engine_kwargs=_connect_kwargs(url),
                                              heartbeat_interval=beat, grace_period=4 * beat,
                                              heartbeat_stale_trial_callback=on_stale_trial)

    for _ in range(_SCHEMA_ATTEMPTS - 1):
        try:
            return storage()
        except (IntegrityError, ProgrammingError):  # another process created the same table, type or index first
            time.sleep(random.uniform(0.2, 1.0))
    return storage()


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
