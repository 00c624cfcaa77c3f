"""The same fixed-budget search run by 1, 2 and 4 processes on one machine against a real PostgreSQL Optuna storage and
a real ``mlflow server`` on PostgreSQL (issue #18 item 5): throughput, lost and duplicated trials, and the coordination
overhead per trial.

One PostgreSQL cluster (``tests.scaleout.conftest.Postgres``: Debian's server binaries, trust authentication on
loopback) and one ``mlflow server`` on it (``tests.server_process.ServerProcess``, loopback only) serve the whole
benchmark. For each worker count k (``--workers``), a fresh Optuna database ``optuna_w<k>``, MLflow experiment and study
``scaleout-w<k>``: a coordinator (``mlflow-edge search --storage … --study-name … --trials N``; it creates the study,
logs the reference, runs trials, waits for the workers, stores the front's models and promotes) and k-1 workers
(``mlflow-edge search --worker``) start together, each in its own process. The budget N (``--trials``) counts every
process's measured trials; the database's Optuna schema is created before they start (untimed), so they do not race
to create it. Search settings: llama.cpp only, screening off, gate ``accuracy_retention>=0.5``, 2 windows
of 64 tokens, 2 speed repeats, ``--threads`` runtime threads (default 1, so 4 processes share 2 cores fairly),
``MLFLOW_EDGE_TRIAL_HEARTBEAT=5``. The model is a tiny random Llama (2 layers, hidden 256, SmolLM2's tokenizer, seed 0:
a trial takes seconds) or, with ``--model demo``, SmolLM2-135M. The llama.cpp conversion is made once, untimed, into a
scratch cache; each worker count then gets a fresh cache that links only that (and the source), so every count pays
its own reference, quantizations and importance matrices.

Measured per worker count, from the Optuna storage (``optuna.load_study``), the MLflow server and the process clocks:

- ``wall_s``: coordinator start → every process exited; ``trials_per_min`` = measured trials / wall minutes
  (measured: COMPLETE, PRUNED, or FAIL with the ``error`` user attribute);
- ``lost``: configurations some trial took but no measured trial has (a FAIL without ``error``, i.e. left by a stopped
  process, or a trial left RUNNING/WAITING); ``duplicated``: measured trials (``twin_of`` ones aside) repeating the
  parameters of another; ``shortfall``/``overshoot``: measured trials below/above the budget;
- **coordination per trial** (the goal figure, < 2 % of the median trial duration): each process's time that is
  neither a trial's own work nor fixed per-process work, over the measured trials. A trial's own work is its MLflow
  run (``start_time`` → ``end_time``: quantize, evaluate, log; for a run reopened after the search to store its model,
  up to its metrics' first log); what remains of the trial (Optuna ``datetime_start`` → ``datetime_complete``:
  sampling, user attributes, the twin check, ``tell``) plus the gaps between a process's consecutive trials
  (callbacks, stale-trial checks, ``ask``) is coordination. Only public figures are used (no wrapped storage).
- **whole-process overhead per trial** (reported, no goal): Σ process wall times − Σ trial durations − the coordinator's
  fixed work (its reference run; and from the budget's last trial to its exit: storing the front's models, the report,
  the promotion), plus the in-trial part above, over the measured trials. It adds each process's start-up (imports,
  the workers' wait for the coordinator's study record and reference) and idle tail (a process with nothing left to
  run while others finish): fixed per process, so it shrinks as the budget grows.

A 2-core machine can show that nothing is lost or measured twice and what coordination costs per trial; it cannot show
a speed-up: 2 or 4 processes of CPU-bound trials on 2 cores share the same cores (and the tracking server and
PostgreSQL run there too), so ``speedup`` is reported without a goal. The processes sample different configurations
(each worker seeds its own sampler), so per-trial work differs between worker counts.

Output: JSON lines on stdout (progress on stderr), the last one the verdict. Run::

    .venv/bin/python benchmarks/scaleout.py                          # 1, 2 and 4 processes, 8 trials each, tiny model
    .venv/bin/python benchmarks/scaleout.py --workers 1,2,4 --trials 6   # quick look, a few minutes on 2 cores
    .venv/bin/python benchmarks/scaleout.py --model demo --threads 2     # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
GOAL_OVERHEAD_PCT = 2.0
HEARTBEAT_S = "5"
SEARCH_SETTINGS = ("--backends", "llamacpp", "--screen-windows", "0", "--gates", "accuracy_retention>=0.5",
                   "--window", "64", "--windows", "2", "--repeats", "2")
SOURCE_CACHE_ENTRIES = ("demo", "downloads", "wheels", "sdist", "sources", "llama.cpp-scripts")
"""Normal-cache entries the scratch cache links: the demo source (and the tokenizer the tiny model borrows)."""
MEASURED_FAIL = "error"
"""User attribute of a trial that failed while measuring (a FAIL without it was left by a stopped process)."""


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def progress(message: str) -> None:
    print(f"[scaleout {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from mlflow_edge.cli import main; main()", *args]


# -- infrastructure -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def infrastructure(scratch: Path) -> Iterator[tuple[Any, str]]:
    """One PostgreSQL cluster and one ``mlflow server`` on it (loopback), for the whole benchmark: (cluster, URL)."""
    sys.path.insert(0, str(REPO))
    from tests.scaleout.conftest import Postgres
    from tests.server_process import LOOPBACK, ServerProcess, free_port

    postgres = Postgres(scratch / "cluster")  # scratch is world-traversable: the server runs as postgres
    try:
        store, port, folder = postgres.database("mlflow"), free_port(), scratch / "mlflow-server"
        folder.mkdir()
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
                   str(folder / "artifacts"), "--host", LOOPBACK, "--port", str(port), "--workers", "1"]
        server = ServerProcess(command, folder / "server.log", os.environ, cwd=folder, port=port).wait_ready()
        try:
            yield postgres, server.base
        finally:
            server.stop()
    finally:
        postgres.stop()


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random Llama (2 layers, hidden 256, ``torch.manual_seed(0)``) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mlflow_edge.sources import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("demo").path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def linked_cache(folder: Path, origin: Path, names: Sequence[str] | None = None) -> Path:
    """A fresh cache ``folder`` whose entries link those of ``origin`` (``names``, or all it holds)."""
    folder.mkdir(parents=True)
    for name in names if names is not None else sorted(p.name for p in origin.iterdir()):
        if (origin / name).exists():
            (folder / name).symlink_to((origin / name).resolve(), target_is_directory=True)
    return folder


def child_env(server: str, cache: Path) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "MLFLOW_REGISTRY_URI": server,
           "MLFLOW_EDGE_CACHE": str(cache), "MLFLOW_EDGE_TRIAL_HEARTBEAT": HEARTBEAT_S}
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    return env


def warm_up(model: str, env: dict[str, str], folder: Path) -> float:
    """``mlflow-edge convert --backend llamacpp`` once (untimed by the runs): its seconds."""
    start = time.perf_counter()
    with open(folder / "warm-up.log", "w") as log:
        done = subprocess.run(cli("convert", "--model", model, "--backend", "llamacpp", "--experiment",
                                  "scaleout-warm-up"), env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"the warm-up conversion failed:\n{(folder / 'warm-up.log').read_text()[-3000:]}")
    return time.perf_counter() - start


# -- one worker count -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Process:
    """One ``mlflow-edge search`` process: its role, start and exit (epoch seconds), exit status and log."""

    role: str
    popen: subprocess.Popen
    log: Path
    start: float
    end: float | None = None

    @property
    def wall_s(self) -> float:
        return (self.end or time.time()) - self.start


def start(role: str, args: Sequence[str], folder: Path, env: dict[str, str]) -> Process:
    log = folder / f"{role}.log"
    with open(log, "w") as handle:
        began = time.time()
        popen = subprocess.Popen(cli(*args), env=env, cwd=folder, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    return Process(role, popen, log, began)


def wait_all(processes: Sequence[Process], timeout_s: float) -> bool:
    """Wait until every process exited (recording when); past ``timeout_s``, kill the rest. Whether all exited."""
    deadline = time.monotonic() + timeout_s
    while any(p.end is None for p in processes):
        for p in processes:
            if p.end is None and p.popen.poll() is not None:
                p.end = time.time()
        if time.monotonic() > deadline:
            stop_all(processes)
            return False
        time.sleep(0.1)
    return True


def stop_all(processes: Sequence[Process]) -> None:
    """Kill the process group of each process still running (each was started in a session of its own)."""
    for p in processes:
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait(timeout=30)
        if p.end is None:
            p.end = time.time()


def run_count(workers: int, args: argparse.Namespace, model: str, storage: str, env: dict[str, str],
              folder: Path) -> tuple[list[Process], bool]:
    """A coordinator and ``workers - 1`` workers on one study, started together; the processes, whether all ended."""
    name = folder.name
    common = ["--model", model, "--storage", storage, "--study-name", name]
    coordinator = ["search", *common, "--trials", str(args.trials), *SEARCH_SETTINGS, "--threads", str(args.threads),
                   "--experiment", name, "--registered-model", f"{name}-edge"]
    processes = [start("coordinator", coordinator, folder, env)]
    try:
        processes += [start(f"worker{i}", ["search", "--worker", *common], folder, env) for i in range(1, workers)]
        ended = wait_all(processes, args.run_timeout)
    finally:
        stop_all(processes)
    for p in processes:
        if p.popen.returncode != 0:
            progress(f"{name} {p.role} exited with {p.popen.returncode}:\n{p.log.read_text()[-3000:]}")
    return processes, ended


# -- what the storage and the server hold ---------------------------------------------------------------------------
def is_measured(trial: Any) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and MEASURED_FAIL in trial.user_attrs)


def config(trial: Any) -> str:
    """A trial's parameters as one comparable string (a queued trial's fixed parameters before it ran)."""
    return json.dumps(trial.params or trial.system_attrs.get("fixed_params", {}), sort_keys=True, default=str)


def outcome(trials: Sequence[Any], budget: int) -> dict[str, Any]:
    """Measured, lost and duplicated trials of a study (see the module's docstring)."""
    measured = [t for t in trials if is_measured(t)]
    taken = {config(t) for t in measured}
    lost = {config(t) for t in trials if not is_measured(t) and config(t) not in taken
            and t.state.name in ("FAIL", "RUNNING", "WAITING")}
    own = [t for t in measured if "twin_of" not in t.user_attrs]
    return {"measured": len(measured), "lost": len(lost), "duplicated": len(own) - len({config(t) for t in own}),
            "twins": len(measured) - len(own), "shortfall": max(budget - len(measured), 0),
            "overshoot": max(len(measured) - budget, 0), "states": dict(Counter(t.state.name for t in trials))}


def run_seconds(client: Any, run_id: str | None) -> float | None:
    """An MLflow run's duration (its ``start_time`` → ``end_time``), ``None`` when unknown."""
    if not run_id:
        return None
    info = client.get_run(run_id).info
    return None if info.end_time is None or info.start_time is None else (info.end_time - info.start_time) / 1000


def run_span(client: Any, trial: Any, duration: float) -> tuple[float, float]:
    """Seconds from a trial's start to its MLflow run's ``start_time``, and the trial's own work: the run,
    ``start_time`` → ``end_time``. A run reopened after the search to store its model ends later than its trial: its
    work then ends at its metrics' first log (conservative: the requests that tag and end the run count as
    coordination). A twin, or a trial without a run: no work."""
    run_id = trial.user_attrs.get("run_id")
    if not run_id or "twin_of" in trial.user_attrs:
        return 0.0, 0.0
    info = client.get_run(run_id).info
    end = info.end_time
    if end is None or end > trial.datetime_complete.timestamp() * 1000:
        metrics = trial.user_attrs.get("metrics") or trial.user_attrs.get("screen") or {}
        key = "size_mb" if "size_mb" in metrics else next(iter(metrics), None)
        end = min((m.timestamp for m in client.get_metric_history(run_id, key)), default=None) if key else None
    if end is None or info.start_time is None:
        return 0.0, 0.0
    head = min(max(info.start_time / 1000 - trial.datetime_start.timestamp(), 0.0), duration)
    return head, max(min((end - info.start_time) / 1000, duration - head), 0.0)


def owned_by(trial: Any, pid: int) -> bool:
    """Whether ``trial``'s owner attribute (``<host>:<pid>-<start time>``) names process ``pid``."""
    return trial.user_attrs.get("owner", "").rpartition(":")[2].split("-")[0] == str(pid)


def process_timing(process: Process, trials: Sequence[Any], client: Any) -> dict[str, Any]:
    """How ``process`` spent its wall time: before its first trial, its trials (own work, the rest of each trial),
    between its trials, after its last."""
    mine = sorted((t for t in trials if owned_by(t, process.popen.pid) and t.datetime_start and t.datetime_complete),
                  key=lambda t: t.datetime_start)
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in mine]
    durations = [end - begin for begin, end in spans]
    heads, work = zip(*(run_span(client, t, d) for t, d in zip(mine, durations))) if mine else ((), ())
    return {"role": process.role, "pid": process.popen.pid, "rc": process.popen.returncode,
            "wall_s": process.wall_s, "trials": len(mine), "trials_s": sum(durations), "work_s": sum(work),
            "in_trial_s": sum(durations) - sum(work), "in_trial_before_run_s": sum(heads),
            "between_s": sum(max(b[0] - a[1], 0.0) for a, b in zip(spans, spans[1:])),
            "before_first_s": (spans[0][0] if spans else process.end) - process.start,
            "after_last_s": process.end - (spans[-1][1] if spans else process.end),
            "last_complete": spans[-1][1] if spans else None, "durations": durations, "work": work}


def reference_seconds(client: Any, experiment: str) -> float:
    """The coordinator's reference run (role ``reference``) in ``experiment``: its duration."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "tags.`mlflow_edge.role` = 'reference'") if found else []
    return sum(run_seconds(client, r.info.run_id) or 0.0 for r in runs)


def overheads(processes: Sequence[Process], trials: Sequence[Any], server: str, experiment: str,
              measured: int) -> dict[str, Any]:
    """The per-process accounting, the coordination per trial and the whole-process overhead per trial."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server, registry_uri=server)
    rows = [process_timing(p, trials, client) for p in processes]
    durations = [d for r in rows for d in r.pop("durations")]
    work = [w for r in rows for w in r.pop("work")]
    last = max((r.pop("last_complete") or 0.0) for r in rows)
    reference_s = reference_seconds(client, experiment)
    finish_s = max(processes[0].end - last, 0.0) if last else 0.0
    total = {k: sum(r[k] for r in rows) for k in ("wall_s", "trials_s", "work_s", "in_trial_s", "in_trial_before_run_s",
                                                   "between_s", "before_first_s", "after_last_s")}
    coordination = total["in_trial_s"] + total["between_s"]
    startup = total["before_first_s"] - reference_s
    tail = total["after_last_s"] - finish_s
    whole = startup + tail + coordination
    median = statistics.median(durations) if durations else None

    def per_trial(seconds: float, percent: bool = False) -> float | None:
        if not measured or (percent and not median):
            return None
        return 100 * seconds / measured / median if percent else seconds / measured

    return {"trial_s_median": median, "work_s_median": statistics.median(work) if work else None,
            "coordination_s_per_trial": per_trial(coordination), "coordination_pct": per_trial(coordination, True),
            "overhead_process_s_per_trial": per_trial(whole), "overhead_process_pct": per_trial(whole, True),
            "accounting_s": {"processes": total["wall_s"], "trials": total["trials_s"], "work": total["work_s"],
                             "in_trial": total["in_trial_s"], "in_trial_before_run": total["in_trial_before_run_s"],
                             "between_trials": total["between_s"],
                             "reference": reference_s, "finish": finish_s, "startup": startup, "idle_tail": tail},
            "processes": rows}


def measure(workers: int, processes: Sequence[Process], ended: bool, storage: str, server: str, name: str,
            budget: int) -> dict[str, Any]:
    """One JSON record for a worker count."""
    import optuna

    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the coordinator stopped before it created the study
        trials = []
    result = outcome(trials, budget)
    wall = max(p.end for p in processes) - processes[0].start
    return {"workers": workers, "wall_s": wall, "budget": budget, **result,
            "trials_per_min": result["measured"] / (wall / 60), "ended": ended,
            "failed_processes": sum(p.popen.returncode != 0 for p in processes),
            **overheads(processes, trials, server, name, result["measured"]),
            "sampled": [{"number": t.number, "state": t.state.name, "params": t.params,
                         **{k: t.user_attrs[k] for k in ("twin_of", MEASURED_FAIL) if k in t.user_attrs}}
                        for t in trials]}


# -- verdict and driver ---------------------------------------------------------------------------------------------
def verdict(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Goals: nothing lost or duplicated, the budget measured, no process failed, coordination < 2 % of a trial."""
    pcts = [r["coordination_pct"] for r in runs]
    overhead = max(pcts) if runs and None not in pcts else None
    checks: dict[str, Any] = {
        "lost": {"value": sum(r["lost"] for r in runs), "goal": "0"},
        "duplicated": {"value": sum(r["duplicated"] for r in runs), "goal": "0"},
        "shortfall": {"value": sum(r["shortfall"] for r in runs), "goal": "0"},
        "failed_processes": {"value": sum(r["failed_processes"] + (not r["ended"]) for r in runs), "goal": "0"},
    }
    for check in checks.values():
        check["ok"] = check["value"] == 0
    checks["overhead_pct_max"] = {"value": overhead, "goal": f"< {GOAL_OVERHEAD_PCT}",
                                  "ok": overhead is not None and overhead < GOAL_OVERHEAD_PCT}
    process_pcts = [r["overhead_process_pct"] for r in runs if r["overhead_process_pct"] is not None]
    checks["overhead_process_pct_max"] = {"value": max(process_pcts, default=None), "goal": None,
                                          "note": "reported: adds per-process start-up and idle tails"}
    low, high = min(runs, key=lambda r: r["workers"]), max(runs, key=lambda r: r["workers"])
    if high is not low:
        checks[f"speedup_{high['workers']}_vs_{low['workers']}"] = {
            "value": high["trials_per_min"] / low["trials_per_min"] if low["trials_per_min"] else None,
            "goal": None, "note": "trials/min ratio; no goal: CPU-bound trials cannot speed up beyond the cores"}
    ok = bool(runs) and all(c["ok"] for c in checks.values() if c["goal"] is not None)
    return {"verdict": "meets goals" if ok else "misses goals", "checks": checks}


def run(args: argparse.Namespace, scratch: Path, user_cache: Path) -> int:
    import optuna

    from mlflow_edge.targets import hardware_fingerprint

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = linked_cache(scratch / "cache-base", user_cache, SOURCE_CACHE_ENTRIES)
    model = "demo" if args.model == "demo" else str(tiny_model(scratch / "tiny-llama"))
    progress("starting PostgreSQL and mlflow server")
    with infrastructure(scratch) as (postgres, server):
        progress(f"warm-up: converting {args.model} for llama.cpp (untimed)")
        warm_s = warm_up(model, child_env(server, base), scratch)
        emit({"setup": {"model": args.model, "workers": args.workers, "trials": args.trials,
                        "threads": args.threads, "cpus": os.cpu_count(), "heartbeat_s": int(HEARTBEAT_S),
                        "settings": " ".join(SEARCH_SETTINGS), "warm_up_s": warm_s, "tracking": "mlflow server on "
                        "PostgreSQL (loopback)", "optuna_storage": "PostgreSQL, a database per worker count",
                        "goal": f"coordination per trial < {GOAL_OVERHEAD_PCT} % of the median trial duration",
                        "definitions": {
                            "coordination": "per process: trial durations (Optuna) minus their MLflow runs (a run "
                                            "reopened to store its model: up to its metrics' first log), plus the "
                                            "gaps between its consecutive trials",
                            "overhead_process": "process wall times minus trial durations, the coordinator's "
                                                "reference run and finish (last trial to its exit), plus the "
                                                "in-trial coordination"}}})
        runs = []
        for workers in args.workers:
            name = f"scaleout-w{workers}"
            folder = scratch / name
            linked_cache(folder / "cache", base)
            storage = postgres.database(f"optuna_w{workers}")
            optuna.storages.RDBStorage(storage).engine.dispose()  # the schema, before processes race to create it
            progress(f"{name}: 1 coordinator + {workers - 1} worker(s), budget {args.trials}")
            processes, ended = run_count(workers, args, model, storage, child_env(server, folder / "cache"), folder)
            runs.append(measure(workers, processes, ended, storage, server, name, args.trials))
            emit(runs[-1])
            progress(f"{name}: {runs[-1]['wall_s']:.0f} s, {runs[-1]['measured']} measured, "
                     f"coordination {runs[-1]['coordination_pct']} % of a trial")
    emit({"benchmark": "scaleout", **verdict(runs), "machine": hardware_fingerprint()})
    return 0


def positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers separated by commas, got {text!r}")
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=positive_ints, default=[1, 2, 4],
                        help="process counts to run, coordinator included (default 1,2,4)")
    parser.add_argument("--trials", type=int, default=8, help="the study's budget of measured trials")
    parser.add_argument("--model", choices=("tiny", "demo"), default="tiny",
                        help="tiny: a 2-layer random Llama (seconds per trial); demo: SmolLM2-135M")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads of every process's evaluations")
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds one worker count may take")
    args = parser.parse_args(argv)
    if min(args.trials, args.threads) < 1 or args.run_timeout <= 0:
        parser.error("--trials, --threads and --run-timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    import pytest  # the shared test infrastructure refuses with pytest.fail

    args = parse_args(argv)
    user_cache = Path(os.environ.get("MLFLOW_EDGE_CACHE") or Path.home() / ".cache" / "mlflow-edge").resolve()
    scratch = Path(tempfile.mkdtemp(prefix="scaleout-"))
    scratch.chmod(0o755)  # PostgreSQL runs as its own user and must reach its folder
    try:
        return run(args, scratch, user_cache)
    except pytest.fail.Exception as exc:
        progress(f"infrastructure failed: {exc}")
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
