"""Whether the Optuna search finds the exhaustive grid's front for a fraction of its cost, spending every trial on
something new (issue #19), and how a fixed-budget search's cost grows with the model.

**Part A (default): search vs. exhaustive grid.** On the offline demo source (SmolLM2-135M, ``resolve_source("demo")``)
for target ``cpu``, over ``--backends`` (default: every registered backend installed for ``cpu``,
:func:`mlflow_edge.search.space.backends_for`), two paths are timed by wall clock, each in its own temporary folder
(the working directory meanwhile) with its own sqlite MLflow and Optuna stores and its own fresh ``MLFLOW_EDGE_CACHE``
(so neither reuses a quantization or an importance matrix of the other, or of earlier runs):

- **search** (first): ``run_search(SearchConfig("demo", target="cpu", trials=N, seed=0, backends=...,
  settings=...))``: the reference, N trials (quantize + evaluate, logged as MLflow runs with their models), the report
  and the promotion;
- **exhaustive** (second): every point of the space (:func:`mlflow_edge.search.space.enumerate_space`; for llama.cpp
  14 precisions × ``imatrix`` False/True), each ``artifacts.quantize`` + ``Evaluator.evaluate`` with the same settings
  and calibration text, plus the reference once. The grid logs nothing to MLflow, so ``wall_time_ratio`` is
  conservative.

Untimed and shared: the dequantized demo source and each backend's base conversion, taken from the normal cache.
Feasible = passes the current :data:`mlflow_edge.gates.DEFAULT_GATES`. Reported: ``hypervolume_ratio`` (search
feasible points / grid feasible points, over ``size_mb`` min, ``decode_tok_s`` max, ``accuracy_retention`` max, each
normalized to [0, 1] over grid ∪ search, reference point the worst corner + 0.1; exact, by slicing), the wall times
and ``wall_time_ratio`` = search / grid, whether the promoted ``cpu-champion`` (matched to the grid point of the same
backend, precision and options) is on the grid's feasible front, ``distinct_per_trial`` (distinct parameter sets /
trials measured: COMPLETE, PRUNED, or FAIL with an error) and the bytes the search stored. Goals: hypervolume ratio
≥ 0.95, wall-time ratio ≤ 0.15, distinct per trial = 1.0, and the full grid (no ``--limit-grid``).

**Part B (``--growth``): cost growth.** The same fixed-budget search (``--growth-trials``, llama.cpp only unless
``--backends``; screening off, so no trial is cut short by chance) on the demo and on random Llamas (SmolLM2's
tokenizer, ``torch.manual_seed(0)``) of ``--growth-layers`` (4) layers and SmolLM2's proportions at
``--growth-widths`` multiples of ``--growth-hidden`` (576): head dim 64, a third as many KV heads, intermediate
8/3 × hidden (576/1152/2304 hidden → 1536/3072/6144), tied embeddings; ≈ 42 M / 113 M / 340 M parameters. Each search
runs in its own process (``--growth-one``) with its own stores and a fresh cache that links only the sources, so every
model pays its own base conversion, and reports its wall time, peak RSS (its own and its children's ``ru_maxrss``)
and bytes stored. Goal: wall-time ratio ≤ parameter ratio × 1.1 against the smallest model, for every model.

Output: JSON lines on stdout (progress on stderr), each part ending with a verdict line. Run::

    .venv/bin/python benchmarks/search_efficiency.py --trials 4 --windows 2 --repeats 2 --limit-grid 8  # quick look
    .venv/bin/python benchmarks/search_efficiency.py --growth --growth-widths 1,2 --growth-trials 2     # quick look
    .venv/bin/python benchmarks/search_efficiency.py [--trials 6] [--window 128] [--windows 4] [--repeats 3]

The default full run takes long on a 2-core machine: it evaluates every point of every installed backend (100 with
llama.cpp, ONNX Runtime and OpenVINO, whose AWQ and scale-estimation points are slow), likely hours; ``--backends
llamacpp`` (28 points, 8-60 s each there) takes roughly 15-30 minutes, and the default ``--growth`` (a 340 M-parameter
model among them) about 15. The quick looks above took about 6 and 7 minutes there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import unquote, urlparse

GOALS = {"hypervolume_ratio": 0.95, "wall_time_ratio": 0.15, "distinct_per_trial": 1.0}
GROWTH_SLACK = 1.1
"""Cost may grow at most this much faster than the parameter count."""
HV_OBJECTIVES: tuple[tuple[str, str], ...] = (
    ("size_mb", "minimize"), ("decode_tok_s", "maximize"), ("accuracy_retention", "maximize"))
HV_MARGIN = 0.1
"""Reference point of the hypervolume: the worst corner of the normalized objectives + 0.1 (the usual choice; a
reference at the worst corner itself gives a point that is worst in any objective no volume, and the ratio jumps)."""
SOURCE_CACHE_ENTRIES = ("demo", "downloads", "wheels", "sdist", "sources", "llama.cpp-scripts")
"""Normal-cache entries the fresh caches link: the demo source, its dequantized checkpoint, converter scripts, and
(in part A, added in :func:`isolated`) every backend's base conversions (``convert-<backend>``)."""
REPORTED = ("size_mb", "bits_per_weight", "compression_ratio", "decode_tok_s", "prefill_tok_s", "speedup",
            "latency_cv", "peak_rss_mb", "perplexity", "kld_mean", "top1_agreement", "accuracy_retention")
MEASURED_FAIL = "error"
"""User attribute of a trial that failed while measuring (a FAIL without it was left stale, never measured)."""


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def progress(message: str) -> None:
    print(f"[search_efficiency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def isolated(folder: Path, user_cache: Path, link_conversions: bool = True) -> Iterator[None]:
    """Inside the block: ``MLFLOW_EDGE_CACHE`` = a fresh ``folder/cache`` linking only :data:`SOURCE_CACHE_ENTRIES`
    (and the base conversions when ``link_conversions``) of ``user_cache``, MLflow tracking/registry on
    ``folder/mlflow.db``, and ``folder`` as the working directory (where MLflow puts the artifacts)."""
    import mlflow

    from mlflow_edge.backends import backend_names

    cache = folder / "cache"
    cache.mkdir(parents=True)
    conversions = [f"convert-{backend}" for backend in backend_names()] if link_conversions else []
    for name in (*SOURCE_CACHE_ENTRIES, *conversions):
        if (user_cache / name).exists():
            (cache / name).symlink_to(user_cache / name, target_is_directory=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_EDGE_CACHE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    cwd = Path.cwd()
    os.environ.update(MLFLOW_EDGE_CACHE=str(cache), MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def subset(metrics: dict[str, float] | None) -> dict[str, float] | None:
    return None if metrics is None else {k: metrics[k] for k in REPORTED if k in metrics}


def parse_backends(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """``--backends`` (comma list) checked against the backends installed for ``cpu``; ``default`` when not given."""
    from mlflow_edge.search.space import backends_for

    installed = backends_for("cpu")
    chosen = tuple(dict.fromkeys(b.strip() for b in text.split(",") if b.strip())) if text else tuple(default)
    unknown = [b for b in chosen if b not in installed]
    if unknown or not chosen:
        raise SystemExit(f"--backends: {', '.join(unknown) or 'none given'} not installed for cpu "
                         f"(installed: {', '.join(installed) or 'none'})")
    return chosen


# -- the space ------------------------------------------------------------------------------------------------------
def grid(backends: Sequence[str]) -> list[dict[str, Any]]:
    """Every point of the space, ``[{"backend", "params", "precision", "options"}]``: the parameter sets of
    :func:`~mlflow_edge.search.space.enumerate_space`, replayed through the search's own ``suggest`` (Optuna's
    ``FixedTrial``) to get the precision and options each one quantizes with."""
    import optuna

    from mlflow_edge.search.space import enumerate_space, suggest

    space = enumerate_space(backends)
    if space is None:
        raise SystemExit(f"the space of {', '.join(backends)} cannot be enumerated (a continuous parameter or too "
                         "many points): no exhaustive grid to compare with")
    points = []
    for params in space:
        backend, precision, options = suggest(optuna.trial.FixedTrial(params), backends)
        points.append({"backend": backend, "params": params, "precision": precision, "options": options})
    return points


def starting_params(backends: Sequence[str]) -> list[dict[str, Any]]:
    """Each backend's own defaults as trial parameters: what a new search measures first."""
    from mlflow_edge.backends import get_backend

    return [{"backend": name, **point} for name in backends for point in get_backend(name).starting_points()]


# -- fronts and hypervolume -----------------------------------------------------------------------------------------
def pareto(rows: list[dict[str, Any]], objectives: Sequence[tuple[str, str]]) -> set[int]:
    """Indices (into ``rows``) of the non-dominated rows by ``row["metrics"]``, by Optuna's own ``best_trials``."""
    import optuna

    study = optuna.create_study(directions=[d for _, d in objectives])
    for i, row in enumerate(rows):
        study.add_trial(optuna.trial.create_trial(values=[row["metrics"][m] for m, _ in objectives],
                                                  user_attrs={"row": i}))
    return {t.user_attrs["row"] for t in study.best_trials}


def objective_points(metrics: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """The metric sets that have a finite value for every :data:`HV_OBJECTIVES` metric."""
    return [m for m in metrics if all(isinstance(m.get(k), (int, float)) and math.isfinite(m[k])
                                      for k, _ in HV_OBJECTIVES)]


def normalized(sets: Sequence[Sequence[dict[str, float]]]) -> list[list[tuple[float, ...]]]:
    """Each set's points in [0, 1]³ to minimize (0 = best, 1 = worst over the union of ``sets``)."""
    union = [m for points in sets for m in points]
    bounds = {k: (min(m[k] for m in union), max(m[k] for m in union)) for k, _ in HV_OBJECTIVES} if union else {}

    def scale(m: dict[str, float], key: str, direction: str) -> float:
        low, high = bounds[key]
        x = (m[key] - low) / (high - low) if high > low else 0.0
        return x if direction == "minimize" else (1.0 - x if high > low else 0.0)

    return [[tuple(scale(m, k, d) for k, d in HV_OBJECTIVES) for m in points] for points in sets]


def hypervolume(points: Sequence[tuple[float, ...]], reference: tuple[float, ...]) -> float:
    """Exact hypervolume (minimization) of ``points`` below ``reference``, by slicing along the last axis: each slab
    between successive last coordinates holds the (d-1)-dimensional hypervolume of the points below it. O(n^d)."""
    points = [p for p in points if all(x < r for x, r in zip(p, reference))]
    if not points:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in points)
    points.sort(key=lambda p: p[-1])
    volume = 0.0
    for i, point in enumerate(points):
        top = points[i + 1][-1] if i + 1 < len(points) else reference[-1]
        if top > point[-1]:
            volume += (top - point[-1]) * hypervolume([p[:-1] for p in points[: i + 1]], reference[:-1])
    return volume


def hypervolumes(search: Sequence[dict[str, float]], exhaustive: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Hypervolume of the search's and the grid's feasible points over :data:`HV_OBJECTIVES` and their ratio."""
    search, exhaustive = objective_points(search), objective_points(exhaustive)
    reference = (1.0 + HV_MARGIN,) * len(HV_OBJECTIVES)
    search_pts, grid_pts = normalized([search, exhaustive])
    search_hv, grid_hv = hypervolume(search_pts, reference), hypervolume(grid_pts, reference)
    return {"search_hypervolume": search_hv, "grid_hypervolume": grid_hv,
            "hypervolume_ratio": search_hv / grid_hv if grid_hv > 0 else None,
            "hypervolume_points": {"search": len(search), "grid": len(exhaustive)},
            "hypervolume_objectives": [f"{d[:3]}:{m}" for m, d in HV_OBJECTIVES]}


# -- what a search stored and measured ------------------------------------------------------------------------------
def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def artifact_bytes() -> int:
    """Bytes of every file under the artifact roots of the current MLflow store's experiments."""
    from mlflow import MlflowClient

    roots = set()
    for experiment in MlflowClient().search_experiments():
        location = experiment.artifact_location or ""
        parsed = urlparse(location)
        roots.add(Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(location))
    return sum(tree_bytes(root.resolve()) for root in roots if root.is_dir())


def stored_bytes(result: dict[str, Any] | None) -> dict[str, Any]:
    """``bytes_logged``: the search's own figure (its result, else its parent run's metric), else the artifact
    roots' size; and where it came from."""
    from mlflow import MlflowClient

    root = artifact_bytes()
    if result is not None and result.get("bytes_logged") is not None:
        return {"bytes_logged": result["bytes_logged"], "bytes_logged_from": "result", "artifact_root_bytes": root}
    if result is not None and result.get("run_id"):
        logged = MlflowClient().get_run(result["run_id"]).data.metrics.get("bytes_logged")
        if logged is not None:
            return {"bytes_logged": logged, "bytes_logged_from": "parent_run_metric", "artifact_root_bytes": root}
    return {"bytes_logged": root, "bytes_logged_from": "artifact_root", "artifact_root_bytes": root}


def measured_trials(study: Any) -> list[Any]:
    """Trials that measured something: COMPLETE, PRUNED, or FAIL with an error (not a stale one)."""
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and MEASURED_FAIL in t.user_attrs)]


def study_summary(study: Any) -> dict[str, Any]:
    """The trials, ``distinct_per_trial`` and the feasible metric sets (current default gates) of ``study``."""
    from optuna.trial import TrialState

    from mlflow_edge.gates import DEFAULT_GATES

    measured = measured_trials(study)
    distinct = len({json.dumps(t.params, sort_keys=True, default=str) for t in measured})
    feasible = [t.user_attrs["metrics"] for t in study.trials if t.state == TrialState.COMPLETE
                and t.user_attrs.get("metrics") and DEFAULT_GATES.check(t.user_attrs["metrics"]).passed]
    return {"sampled": [{"number": t.number, "state": t.state.name, "params": t.params,
                         **{k: t.user_attrs[k] for k in ("twin_of", MEASURED_FAIL) if k in t.user_attrs},
                         **(subset(t.user_attrs.get("metrics")) or {})} for t in study.trials],
            "measured_trials": len(measured), "distinct_configs": distinct,
            "distinct_per_trial": distinct / len(measured) if measured else None,
            "feasible": feasible}


def timed_search(model: str, backends: Sequence[str], trials: int, settings: Any, folder: Path,
                 **options: Any) -> dict[str, Any]:
    """``run_search`` on ``model`` with an Optuna store in ``folder`` (timed), then its study and stored bytes."""
    import optuna

    from mlflow_edge.errors import EdgeError
    from mlflow_edge.search import SearchConfig, run_search

    storage = f"sqlite:///{folder / 'optuna.db'}"
    start = time.perf_counter()
    error = None
    try:
        result = run_search(SearchConfig(model, target="cpu", trials=trials, seed=0, settings=settings,
                                         backends=list(backends), storage=storage, study_name="search-efficiency",
                                         **options))
    except EdgeError as exc:  # e.g. no trial passed the gates: nothing promoted
        result, error = None, str(exc)
    wall_s = time.perf_counter() - start
    url = result.get("storage", storage) if result is not None else storage
    try:
        study = optuna.load_study(study_name="search-efficiency", storage=storage if "***" in url else url)
    except KeyError:  # the search refused before it opened its study
        return {"wall_s": wall_s, "error": error, "result": result, "sampled": [], "measured_trials": 0,
                "distinct_configs": 0, "distinct_per_trial": None, "feasible": [], **stored_bytes(result)}
    return {"wall_s": wall_s, "error": error, "result": result, **study_summary(study), **stored_bytes(result)}


# -- part A: the two paths ------------------------------------------------------------------------------------------
def champion(registered_model: str) -> dict[str, Any] | None:
    """The ``cpu-champion`` version of ``registered_model`` (else of the store's first registered model): backend,
    precision, options as logged, metrics."""
    from mlflow import MlflowClient

    from mlflow_edge.registry import champion_alias

    client = MlflowClient()
    names = [m.name for m in client.search_registered_models()]
    name = registered_model if registered_model in names or not names else names[0]
    try:
        version = client.get_model_version_by_alias(name, champion_alias("cpu"))
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        progress(f"no champion: {exc}")
        return None
    run = client.get_run(version.tags.get("mlflow_edge.run_id") or version.run_id)
    backend = version.tags.get("backend") or run.data.params.get("backend")
    options = {k[len(backend) + 1:]: v for k, v in run.data.params.items() if k.startswith(f"{backend}.")}
    return {"registered_model": name, "version": version.version, "backend": backend,
            "precision": version.tags.get("precision") or run.data.params.get("precision"),
            "options": options, "run_id": run.info.run_id, "metrics": subset(dict(run.data.metrics))}


def run_search_path(args: argparse.Namespace, settings: Any, backends: Sequence[str], folder: Path,
                    registered_model: str) -> dict[str, Any]:
    search = timed_search("demo", backends, args.trials, settings, folder)
    result = search.pop("result")
    summary: dict[str, Any] = {"path": "search", "trials": args.trials, **search}
    if result is not None:
        summary.update(study=result.get("study"), promotion=result.get("promotion"),
                       pareto_size=len(result.get("pareto") or []))
    summary["promoted"] = champion(registered_model) if result is not None else None
    return summary


def run_grid_path(settings: Any, points: list[dict[str, Any]]) -> dict[str, Any]:
    from mlflow_edge import artifacts
    from mlflow_edge.evaluation.data import calibration_text
    from mlflow_edge.evaluation.harness import Evaluator
    from mlflow_edge.gates import DEFAULT_GATES
    from mlflow_edge.sources import resolve_source

    calibration = calibration_text(None)
    start = time.perf_counter()
    source = resolve_source("demo")
    evaluator = Evaluator(source, settings)
    rows = []
    try:
        progress("grid: measuring the reference")
        evaluator.evaluate_reference()
        for i, point in enumerate(points, 1):
            progress(f"grid {i}/{len(points)}: {point['params']}")
            t0 = time.perf_counter()
            row = {"path": "exhaustive", "point": i, **point, "metrics": None, "error": None}
            try:
                base = artifacts.convert(source, point["backend"])
                artifact = artifacts.quantize(source, base, point["precision"], point["options"], calibration)
                t1 = time.perf_counter()
                metrics = evaluator.evaluate(artifact)
                report = DEFAULT_GATES.check(metrics)
                row.update(quantize_s=t1 - t0, evaluate_s=time.perf_counter() - t1, metrics=metrics,
                           gates=report.describe(), passes_gates=report.passed)
            except Exception as exc:  # noqa: BLE001 - one failed point does not stop the grid
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            emit({**{k: v for k, v in row.items() if k != "metrics"}, "metrics": subset(row["metrics"])})
    finally:
        evaluator.close()
    return {"wall_s": time.perf_counter() - start, "rows": rows}


def same_config(row: dict[str, Any], promoted: dict[str, Any]) -> bool:
    """The grid point of the promoted version: same backend and precision, and its options as logged (strings)."""
    if row["backend"] != promoted["backend"] or row["precision"] != promoted["precision"]:
        return False
    logged = promoted["options"]
    return all(str(value) == logged.get(key, str(value)) for key, value in row["options"].items()
               if key != "imatrix_chunks" or "imatrix_chunks" in logged)


def champion_on_front(rows: list[dict[str, Any]], promoted: dict[str, Any] | None) -> dict[str, Any]:
    """The grid's feasible fronts (all of :data:`HV_OBJECTIVES`; size and accuracy alone, since speed is noisy) and
    whether the grid's own measurement of the promoted config lies on them."""
    feasible = [r for r in rows if r["metrics"] is not None and r.get("passes_gates")]
    feasible = [r for r in feasible if objective_points([r["metrics"]])]
    front = pareto(feasible, HV_OBJECTIVES) if feasible else set()
    size_acc = (pareto(feasible, (("size_mb", "minimize"), ("accuracy_retention", "maximize")))
                if feasible else set())
    match = next((r for r in rows if promoted is not None and same_config(r, promoted)), None)
    index = next((i for i, r in enumerate(feasible) if r is match), None)

    def label(r: dict[str, Any]) -> dict[str, Any]:
        return {"backend": r["backend"], "precision": r["precision"], "options": r["options"]}

    return {"promoted_on_pareto_front": None if match is None else index in front,
            "promoted_on_size_accuracy_front": None if match is None else index in size_acc,
            "promoted_in_grid": None if match is None else {"passes_gates": match.get("passes_gates"),
                                                            **(subset(match["metrics"]) or {})},
            "pareto_front": [label(feasible[i]) for i in sorted(front)],
            "size_accuracy_front": [label(feasible[i]) for i in sorted(size_acc)],
            "grid_feasible": len(feasible)}


def verdict(values: dict[str, Any], full_grid: bool) -> dict[str, Any]:
    """Each goal of :data:`GOALS` checked (a missing value fails), and the full grid, which the ratios need."""
    checks: dict[str, Any] = {}
    for key, goal in GOALS.items():
        value = values.get(key)
        ok = value is not None and (value <= goal if key == "wall_time_ratio" else value >= goal)
        checks[key] = {"value": value, "goal": f"{'<=' if key == 'wall_time_ratio' else '>='} {goal}", "ok": ok}
    checks["full_grid"] = {"value": full_grid, "goal": "no --limit-grid", "ok": full_grid}
    return {"verdict": "meets goals" if all(c["ok"] for c in checks.values()) else "misses goals", "checks": checks}


def setup_points(args: argparse.Namespace, backends: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    """The grid to evaluate (the first ``--limit-grid`` points and the starting points, or all) and the space size."""
    points = grid(backends)
    if args.limit_grid is None:
        return points, len(points)
    starts = starting_params(backends)
    kept = points[: args.limit_grid] + [p for p in points[args.limit_grid:] if p["params"] in starts]
    return kept, len(points)


def run(args: argparse.Namespace, user_cache: Path, scratch: Path) -> int:
    import optuna

    from mlflow_edge import artifacts
    from mlflow_edge.evaluation.harness import EvalSettings
    from mlflow_edge.search.space import backends_for
    from mlflow_edge.sources import resolve_source
    from mlflow_edge.targets import hardware_fingerprint

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backends = parse_backends(args.backends, backends_for("cpu"))
    points, full = setup_points(args, backends)
    progress(f"untimed setup in the normal cache {user_cache}: demo source and base conversions")
    os.environ["MLFLOW_EDGE_CACHE"] = str(user_cache)
    source = resolve_source("demo")
    for backend in backends:
        artifacts.convert(source, backend)
    settings = EvalSettings(window=args.window, windows=args.windows, repeats=args.repeats)
    emit({"setup": {"source": source.name, "target": "cpu", "backends": backends, "space_size": full,
                    "grid_points": len(points), "limited": args.limit_grid is not None, "trials": args.trials,
                    "window": settings.window, "windows": settings.windows, "repeats": settings.repeats,
                    "threads": settings.threads, "order": ["search", "exhaustive"], "goals": GOALS,
                    "note": "each path: own temp folder (cwd), MLflow and Optuna sqlite stores and fresh "
                            "MLFLOW_EDGE_CACHE (only the demo source and base conversions linked from the normal "
                            "cache, untimed); the grid logs nothing to MLflow"}})

    progress(f"search: {args.trials} trial(s) over {', '.join(backends)}")
    with isolated(scratch / "search", user_cache):
        search = run_search_path(args, settings, backends, scratch / "search", f"{source.name}-edge")
    search_feasible = search.pop("feasible")
    emit(search)
    progress(f"exhaustive grid: {len(points)} point(s)")
    with isolated(scratch / "grid", user_cache):
        exhaustive = run_grid_path(settings, points)

    rows = exhaustive["rows"]
    grid_feasible = [r["metrics"] for r in rows if r["metrics"] is not None and r.get("passes_gates")]
    values = {**hypervolumes(search_feasible, grid_feasible), "search_s": search["wall_s"],
              "exhaustive_s": exhaustive["wall_s"], "wall_time_ratio": search["wall_s"] / exhaustive["wall_s"],
              "distinct_per_trial": search["distinct_per_trial"]}
    promoted = search["promoted"]
    emit({"summary": "search_efficiency", **values, **champion_on_front(rows, promoted),
          "promoted": None if promoted is None else {
              **{k: promoted[k] for k in ("backend", "precision", "options", "version")},
              **(promoted["metrics"] or {})},
          "starting_points": [{"params": r["params"], **(subset(r["metrics"]) or {})} for r in rows
                              if r["params"] in starting_params(backends)],
          "distinct_configs": search["distinct_configs"], "measured_trials": search["measured_trials"],
          "bytes_logged": search["bytes_logged"], "bytes_logged_from": search["bytes_logged_from"],
          "grid_points": len(rows), "grid_failed": sum(r["error"] is not None for r in rows), "space_size": full,
          "trials": args.trials})
    emit({"benchmark": "search_efficiency", **verdict(values, args.limit_grid is None),
          "note": ("the search ran first, the grid second, each on its own fresh cache and stores; front membership "
                   "uses the grid's own measurement of the promoted config"
                   + ("" if args.limit_grid is None else
                      f"; --limit-grid {args.limit_grid}: only part of the space was evaluated, so the hypervolume "
                      "and wall-time ratios are NOT comparable to the full grid")),
          "machine": hardware_fingerprint()})
    return 0


# -- part B: cost growth --------------------------------------------------------------------------------------------
def build_llama(folder: Path, tokenizer_source: Path, hidden: int, layers: int) -> Path:
    """A random Llama (``torch.manual_seed(0)``) with SmolLM2's proportions and tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    heads = hidden // 64
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64 * round(hidden * 8 / 3 / 64),
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads // 3 if heads % 3 == 0 else heads, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def growth_one(args: argparse.Namespace, user_cache: Path, scratch: Path) -> int:
    """One fixed-budget search on ``--growth-one`` in this process: one JSON line (time, memory, bytes)."""
    import optuna

    from mlflow_edge.evaluation.harness import EvalSettings
    from mlflow_edge.sources import resolve_source

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backends = parse_backends(args.backends, ("llamacpp",))
    settings = EvalSettings(window=args.window, windows=args.windows, repeats=args.repeats)
    folder = scratch / "growth"
    with isolated(folder, user_cache, link_conversions=False):
        params = resolve_source(args.growth_one).num_parameters
        search = timed_search(args.growth_one, backends, args.growth_trials, settings, folder, screen_windows=0)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    emit({"growth_one": args.growth_one, "params": params, "wall_s": search["wall_s"],
          "peak_rss_mb": max(own, children), "peak_rss_mb_self": own, "peak_rss_mb_children": children,
          "bytes_logged": search["bytes_logged"], "bytes_logged_from": search["bytes_logged_from"],
          "cache_bytes": tree_bytes(folder / "cache"), "error": search["error"],
          "sampled": [t["params"] for t in search["sampled"]], "distinct_per_trial": search["distinct_per_trial"]})
    return 0


def growth_child(args: argparse.Namespace, model: str) -> dict[str, Any] | None:
    """Run :func:`growth_one` on ``model`` in a fresh interpreter; its JSON line (``None`` when it printed none)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--growth-one", model,
               "--growth-trials", str(args.growth_trials), "--window", str(args.window),
               "--windows", str(args.windows), "--repeats", str(args.repeats),
               *(["--backends", args.backends] if args.backends else [])]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "growth_one" in record:
                return record
    progress(f"growth run on {model} printed no result (exit status {proc.returncode})")
    return None


def growth(args: argparse.Namespace, scratch: Path) -> int:
    from mlflow_edge.sources import resolve_source
    from mlflow_edge.targets import hardware_fingerprint

    demo = resolve_source("demo")  # untimed: dequantized once into the normal cache
    models = [("demo", "demo")]
    for multiple in args.growth_widths:
        hidden = args.growth_hidden * multiple
        folder = scratch / f"random-llama-h{hidden}-l{args.growth_layers}"
        progress(f"building {folder.name}")
        models.append((f"x{multiple}", str(build_llama(folder, demo.path, hidden, args.growth_layers))))
    emit({"setup": {"mode": "growth", "models": [label for label, _ in models], "trials": args.growth_trials,
                    "backends": args.backends or "llamacpp", "hidden": args.growth_hidden,
                    "layers": args.growth_layers, "widths": args.growth_widths, "window": args.window,
                    "windows": args.windows, "repeats": args.repeats,
                    "note": "each search in its own process, stores and fresh cache (sources linked, base "
                            "conversions not); screening off"}})
    runs = []
    for label, model in models:
        progress(f"growth: {args.growth_trials} trial(s) on {label}")
        record = growth_child(args, model)
        runs.append({"model": label, **(record or {"error": "no result"})})
        emit({"growth": label, **{k: v for k, v in runs[-1].items() if k != "model"}})
    emit({"benchmark": "search_efficiency_growth", **growth_verdict(runs), "machine": hardware_fingerprint()})
    return 0


def growth_verdict(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall time, memory and bytes of each run relative to the smallest model; the goal: wall-time ratio ≤ parameter
    ratio × :data:`GROWTH_SLACK` for every model."""
    done = [r for r in runs if r.get("params") and r.get("wall_s")]
    checks: dict[str, Any] = {r["model"]: {"ok": False, "error": r.get("error")} for r in runs if r not in done}
    if done:
        base = min(done, key=lambda r: r["params"])
        for r in sorted(done, key=lambda r: r["params"]):
            params_ratio, wall_ratio = r["params"] / base["params"], r["wall_s"] / base["wall_s"]
            checks[r["model"]] = {
                "params": r["params"], "params_ratio": params_ratio, "wall_ratio": wall_ratio,
                "wall_per_param_rel": wall_ratio / params_ratio,
                "memory_ratio": r["peak_rss_mb"] / base["peak_rss_mb"] if base.get("peak_rss_mb") else None,
                "bytes_ratio": r["bytes_logged"] / base["bytes_logged"] if base.get("bytes_logged") else None,
                "ok": wall_ratio <= params_ratio * GROWTH_SLACK}
    ok = bool(done) and all(c["ok"] for c in checks.values())
    return {"verdict": "meets goals" if ok else "misses goals", "goal": f"wall_ratio <= params_ratio * {GROWTH_SLACK}",
            "smallest": min(done, key=lambda r: r["params"])["model"] if done else None, "checks": checks}


# -- driver ---------------------------------------------------------------------------------------------------------
def positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers separated by commas, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="search budget in trials")
    parser.add_argument("--window", type=int, default=128, help="tokens per accuracy window")
    parser.add_argument("--windows", type=int, default=4, help="accuracy windows")
    parser.add_argument("--repeats", type=int, default=3, help="speed repeats per evaluation")
    parser.add_argument("--backends", default=None,
                        help="comma list (default: every backend installed for cpu; llamacpp with --growth)")
    parser.add_argument("--limit-grid", type=int, default=None, metavar="N",
                        help="evaluate only the first N grid points (and the backends' starting points); the ratios "
                             "are then not comparable")
    parser.add_argument("--growth", action="store_true", help="part B: cost growth with the parameter count")
    parser.add_argument("--growth-trials", type=int, default=4, help="fixed budget of each growth search")
    parser.add_argument("--growth-widths", type=positive_ints, default=[1, 2, 4],
                        help="multiples of --growth-hidden for the random Llamas (default 1,2,4)")
    parser.add_argument("--growth-hidden", type=int, default=576, help="base hidden size, a multiple of 64")
    parser.add_argument("--growth-layers", type=int, default=4, help="layers of the random Llamas")
    parser.add_argument("--growth-one", default=None, metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.trials, args.growth_trials, args.growth_layers) < 1 or (
            args.limit_grid is not None and args.limit_grid < 1):
        parser.error("--trials, --growth-trials, --growth-layers and --limit-grid must be positive")
    if args.growth_hidden < 64 or args.growth_hidden % 64:
        parser.error("--growth-hidden must be a positive multiple of 64 (head size 64)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    user_cache = Path(os.environ.get("MLFLOW_EDGE_CACHE") or Path.home() / ".cache" / "mlflow-edge").resolve()
    scratch = Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    try:
        if args.growth_one:
            return growth_one(args, user_cache, scratch)
        if args.growth:
            return growth(args, scratch)
        return run(args, user_cache, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
