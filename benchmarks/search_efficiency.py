"""How much cheaper the Optuna search is than the exhaustive grid, and whether what it promotes is on the grid's front.

On the offline demo source (SmolLM2-135M, ``resolve_source("demo")``) for target ``cpu``, over the search space of
every registered backend installed for that target (:func:`mlflow_edge.search.space.backends_for`), two paths are
timed by wall clock, each in its own temporary folder with its own sqlite MLflow store and its own fresh, temporary
``MLFLOW_EDGE_CACHE`` (so neither reuses a quantization or an importance matrix of the other, or of earlier runs):

- **search** (first): ``run_search("demo", target="cpu", trials=N, seed=0, settings=...)``: the reference, N trials
  (quantize + evaluate, logged as MLflow runs with their models), the search report and the promotion;
- **exhaustive** (second): every point of the space (for llama.cpp: 14 precisions × ``imatrix`` False/True), each
  ``artifacts.quantize`` + ``Evaluator.evaluate`` with the same settings and calibration text, plus the reference once.
  The grid logs nothing to MLflow, which only makes it cheaper: the ratio is conservative.

Untimed and shared: the dequantized demo source and the f16 GGUF, taken from the normal cache (the fresh caches link
those entries, and only those, from it). The exhaustive Pareto front is computed over
:data:`~mlflow_edge.search.study.MULTI_OBJECTIVE` (max ``decode_tok_s``, min ``size_mb``, max
``accuracy_retention``) among the grid points passing the default gates; since decode speed is noisy, the front over
the deterministic (``size_mb``, ``accuracy_retention``) is reported too. The promoted artifact is the search store's
``cpu-champion`` version; it is matched to the grid point of the same backend, precision and options.

Output: JSON lines on stdout (progress on stderr). Run::

    .venv/bin/python benchmarks/search_efficiency.py [--trials 6] [--window 128] [--windows 4] [--repeats 3]
    .venv/bin/python benchmarks/search_efficiency.py --trials 4 --windows 2 --repeats 2 --limit-grid 8  # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

GOAL = 0.25
SHARED_CACHE_ENTRIES = ("demo", "downloads", "wheels", "sdist", "sources", "llama.cpp-scripts")
"""Normal-cache entries the fresh caches link: the demo source, its dequantized checkpoint, converter scripts, and
(added in :func:`isolated`) every backend's base conversions (``convert-<backend>``)."""
REPORTED = ("size_mb", "bits_per_weight", "compression_ratio", "decode_tok_s", "prefill_tok_s", "speedup",
            "latency_cv", "peak_rss_mb", "perplexity", "kld_mean", "top1_agreement", "accuracy_retention")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def progress(message: str) -> None:
    print(f"[search_efficiency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def isolated(folder: Path, user_cache: Path) -> Iterator[None]:
    """``MLFLOW_EDGE_CACHE`` = a fresh ``folder/cache`` (linking only :data:`SHARED_CACHE_ENTRIES` of ``user_cache``)
    and MLflow tracking/registry on ``folder/mlflow.db`` inside the block."""
    import mlflow

    cache = folder / "cache"
    cache.mkdir(parents=True)
    from mlflow_edge.backends import BACKENDS

    for name in (*SHARED_CACHE_ENTRIES, *(f"convert-{backend}" for backend in BACKENDS)):
        if (user_cache / name).exists():
            (cache / name).symlink_to(user_cache / name, target_is_directory=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_EDGE_CACHE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ.update(MLFLOW_EDGE_CACHE=str(cache), MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def subset(metrics: dict[str, float] | None) -> dict[str, float] | None:
    return None if metrics is None else {k: metrics[k] for k in REPORTED if k in metrics}


# -- the space ----------------------------------------------------------------------------------------------------
class _Branch(Exception):
    """Raised by :class:`_BranchingTrial` at the first parameter not fixed yet."""

    def __init__(self, name: str, choices: tuple[Any, ...]) -> None:
        super().__init__(name)
        self.name, self.choices = name, choices


class _BranchingTrial:
    """Stands in for an Optuna trial: returns fixed choices, and stops at the first unfixed parameter, so that a
    conditional space (parameters some choices ask for) is enumerated branch by branch."""

    def __init__(self, fixed: dict[str, Any]) -> None:
        self.fixed = fixed

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        if name in self.fixed:
            return self.fixed[name]
        raise _Branch(name, tuple(choices))

    def __getattr__(self, name: str) -> Any:
        raise SystemExit(f"the grid can only enumerate categorical parameters, not {name}")


def grid(backends: tuple[str, ...]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every point of the space: ``[{"backend", "params", "precision", "options"}]`` and all the distributions.

    Each backend's ``search_space`` is replayed depth first: at every parameter it asks for that is not fixed yet,
    the walk branches into each of its choices, so conditional parameters are expanded where they apply."""
    import optuna

    from mlflow_edge.backends import get_backend

    points: list[dict[str, Any]] = []
    distributions: dict[str, Any] = {"backend": optuna.distributions.CategoricalDistribution(list(backends))}
    for backend in backends:
        impl = get_backend(backend)
        pending: list[dict[str, Any]] = [{}]
        while pending:
            fixed = pending.pop()
            try:
                precision, options = impl.search_space(_BranchingTrial(fixed))
            except _Branch as branch:
                distributions[branch.name] = optuna.distributions.CategoricalDistribution(list(branch.choices))
                pending += [{**fixed, branch.name: choice} for choice in reversed(branch.choices)]
                continue
            points.append({"backend": backend, "params": {"backend": backend, **fixed}, "precision": precision,
                           "options": options})
    return points, distributions


def pareto(rows: list[dict[str, Any]], distributions: dict[str, Any],
           objectives: tuple[tuple[str, str], ...]) -> set[int]:
    """Indices (into ``rows``) of the non-dominated rows, by Optuna's own ``best_trials``."""
    import optuna

    study = optuna.create_study(directions=[d for _, d in objectives])
    for i, row in enumerate(rows):
        study.add_trial(optuna.trial.create_trial(
            params=row["params"], distributions={k: distributions[k] for k in row["params"]},
            values=[row["metrics"][m] for m, _ in objectives], user_attrs={"row": i}))
    return {t.user_attrs["row"] for t in study.best_trials}


# -- the two paths --------------------------------------------------------------------------------------------------
def run_search_path(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    import optuna
    from mlflow import MlflowClient

    from mlflow_edge.errors import EdgeError
    from mlflow_edge.registry import champion_alias
    from mlflow_edge.search.study import run_search

    start = time.perf_counter()
    error = None
    try:
        result = run_search("demo", target="cpu", trials=args.trials, seed=0, settings=settings)
    except EdgeError as exc:  # e.g. no trial passed the gates: nothing promoted
        result, error = None, str(exc)
    search_s = time.perf_counter() - start

    summary: dict[str, Any] = {"path": "search", "wall_s": search_s, "trials": args.trials, "error": error}
    promoted = None
    if result is not None:
        study = optuna.load_study(study_name=result["study"], storage=result["storage"])
        summary.update(study=result["study"], promotion=result["promotion"], pareto_size=len(result["pareto"]),
                       sampled=[{"number": t.number, "state": t.state.name, "params": t.params,
                                 **(subset(t.user_attrs.get("metrics")) or {})} for t in study.trials])
        summary["distinct_configs"] = len({json.dumps(t.params, sort_keys=True) for t in study.trials})
        client = MlflowClient()
        name = "SmolLM2-135M-Instruct-edge"
        models = client.search_registered_models()
        if models:
            name = models[0].name
        try:
            version = client.get_model_version_by_alias(name, champion_alias("cpu"))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            summary["error"] = f"no champion: {exc}"
        else:
            run = client.get_run(version.tags.get("mlflow_edge.run_id") or version.run_id)
            backend = version.tags.get("backend") or run.data.params.get("backend")
            options = {k[len(backend) + 1:]: v for k, v in run.data.params.items() if k.startswith(f"{backend}.")}
            promoted = {"registered_model": name, "version": version.version, "backend": backend,
                        "precision": version.tags.get("precision") or run.data.params.get("precision"),
                        "options": options, "run_id": run.info.run_id,
                        "metrics": subset(dict(run.data.metrics))}
    summary["promoted"] = promoted
    return summary


def run_grid_path(args: argparse.Namespace, settings: Any, points: list[dict[str, Any]]) -> dict[str, Any]:
    from mlflow_edge import artifacts
    from mlflow_edge.evaluation.data import calibration_text
    from mlflow_edge.evaluation.harness import Evaluator
    from mlflow_edge.gates import parse_gates
    from mlflow_edge.sources import resolve_source

    gates = parse_gates(None)
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
                row.update(quantize_s=t1 - t0, evaluate_s=time.perf_counter() - t1, metrics=metrics,
                           gates=gates.check(metrics).describe(), passes_gates=gates.check(metrics).passed)
            except Exception as exc:  # noqa: BLE001 - one failed point does not stop the grid
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            emit({**{k: v for k, v in row.items() if k != "metrics"}, "metrics": subset(row["metrics"])})
    finally:
        evaluator.close()
    return {"wall_s": time.perf_counter() - start, "rows": rows}


# -- driver -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="search budget in trials")
    parser.add_argument("--window", type=int, default=128, help="tokens per accuracy window")
    parser.add_argument("--windows", type=int, default=4, help="accuracy windows")
    parser.add_argument("--repeats", type=int, default=3, help="speed repeats per evaluation")
    parser.add_argument("--limit-grid", type=int, default=None, metavar="N",
                        help="evaluate only the first N grid points (and Q4_K_M without imatrix); the ratio is then "
                             "not comparable")
    args = parser.parse_args(argv)
    if args.trials < 1 or (args.limit_grid is not None and args.limit_grid < 1):
        parser.error("--trials and --limit-grid must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    user_cache = Path(os.environ.get("MLFLOW_EDGE_CACHE") or Path.home() / ".cache" / "mlflow-edge")
    scratch = Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    try:
        return run(args, user_cache, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_default(row: dict[str, Any]) -> bool:
    return (row["backend"] == "llamacpp" and row["precision"] == "Q4_K_M"
            and not row["options"].get("imatrix", False))


def same_config(row: dict[str, Any], promoted: dict[str, Any]) -> bool:
    """The grid point of the promoted version: same backend and precision, and its options as logged (strings)."""
    if row["backend"] != promoted["backend"] or row["precision"] != promoted["precision"]:
        return False
    logged = promoted["options"]
    return all(str(value) == logged.get(key, str(value)) for key, value in row["options"].items()
               if key != "imatrix_chunks" or "imatrix_chunks" in logged)


def run(args: argparse.Namespace, user_cache: Path, scratch: Path) -> int:
    import optuna

    from mlflow_edge import artifacts
    from mlflow_edge.evaluation.harness import EvalSettings
    from mlflow_edge.search.space import backends_for
    from mlflow_edge.search.study import MULTI_OBJECTIVE
    from mlflow_edge.sources import resolve_source
    from mlflow_edge.targets import hardware_fingerprint

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    progress(f"untimed setup in the normal cache {user_cache}: demo source and f16 GGUF")
    os.environ["MLFLOW_EDGE_CACHE"] = str(user_cache)
    backends = backends_for("cpu")
    source = resolve_source("demo")
    for backend in backends:
        artifacts.convert(source, backend)
    points, distributions = grid(backends)
    full = len(points)
    if args.limit_grid is not None:
        kept = points[: args.limit_grid]
        kept += [p for p in points[args.limit_grid:] if is_default(p)]
        points = kept
    settings = EvalSettings(window=args.window, windows=args.windows, repeats=args.repeats)
    emit({"setup": {"source": source.name, "target": "cpu", "backends": backends, "space_size": full,
                    "grid_points": len(points), "limited": args.limit_grid is not None, "trials": args.trials,
                    "window": settings.window, "windows": settings.windows, "repeats": settings.repeats,
                    "threads": settings.threads, "order": ["search", "exhaustive"],
                    "note": "each path: own temp MLflow sqlite store and own fresh MLFLOW_EDGE_CACHE (only the demo "
                            "source and the f16 GGUF linked from the normal cache, untimed); the grid logs nothing "
                            "to MLflow"}})

    progress(f"search: {args.trials} trial(s)")
    with isolated(scratch / "search", user_cache):
        search = run_search_path(args, settings)
    emit(search)
    progress(f"exhaustive grid: {len(points)} point(s)")
    with isolated(scratch / "grid", user_cache):
        exhaustive = run_grid_path(args, settings, points)

    rows = exhaustive["rows"]
    feasible = [r for r in rows if r["metrics"] is not None and r.get("passes_gates")]
    front = pareto(feasible, distributions, MULTI_OBJECTIVE) if feasible else set()
    size_acc = (pareto(feasible, distributions, (("size_mb", "minimize"), ("accuracy_retention", "maximize")))
                if feasible else set())
    promoted = search["promoted"]
    on_front = on_size_acc = None
    grid_match = None
    if promoted is not None:
        matches = [r for r in rows if same_config(r, promoted)]
        grid_match = matches[0] if matches else None
        if grid_match is not None:
            idx = next((i for i, r in enumerate(feasible) if r is grid_match), None)
            on_front = idx is not None and idx in front
            on_size_acc = idx is not None and idx in size_acc
    default = next((r for r in rows if is_default(r)), None)
    ratio = search["wall_s"] / exhaustive["wall_s"]

    def label(r: dict[str, Any]) -> dict[str, Any]:
        return {"backend": r["backend"], "precision": r["precision"], "options": r["options"]}

    emit({
        "benchmark": "search_efficiency",
        "search_s": search["wall_s"],
        "exhaustive_s": exhaustive["wall_s"],
        "ratio": ratio,
        "goal": GOAL,
        "meets_goal": ratio <= GOAL if args.limit_grid is None else None,
        "ratio_comparable": args.limit_grid is None,
        "promoted": None if promoted is None else {**{k: promoted[k] for k in ("backend", "precision", "options",
                                                                               "version")},
                                                   **(promoted["metrics"] or {})},
        "promoted_in_grid": None if grid_match is None else {
            "passes_gates": grid_match.get("passes_gates"), **(subset(grid_match["metrics"]) or {})},
        "promoted_on_pareto_front": on_front,
        "promoted_on_size_accuracy_front": on_size_acc,
        "pareto_front": [label(feasible[i]) for i in sorted(front)],
        "size_accuracy_front": [label(feasible[i]) for i in sorted(size_acc)],
        "q4_k_m_default": None if default is None else subset(default["metrics"]),
        "grid_points": len(rows),
        "grid_feasible": len(feasible),
        "grid_failed": sum(r["error"] is not None for r in rows),
        "space_size": full,
        "trials": args.trials,
        "note": ("the search ran first, the grid second, each on its own fresh cache and MLflow store; promoted_*_front"
                 " use the grid's own measurement of the promoted config; promoted metrics are the search's"
                 + ("" if args.limit_grid is None else
                    f"; --limit-grid {args.limit_grid}: only part of the space was evaluated, so the ratio and the "
                    "fronts are NOT comparable to the full grid")),
        "machine": hardware_fingerprint(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
