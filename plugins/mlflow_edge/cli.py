"""``mlflow-edge``: convert, quantize, evaluate and promote models for edge hardware, tracked in MLflow.

The tracking store is MLflow's own setting (``MLFLOW_TRACKING_URI``); ``mlflow run`` entry points call these commands.
Errors print one line (``mlflow-edge: error: …``) and exit 1, with the MLflow run marked FAILED.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

import click

from mlflow_edge.azureml.cli import azureml
from mlflow_edge.errors import EdgeError, one_line_errors

_NEXT_OPTION = re.compile(r",(?=\s*[A-Za-z_][\w.]*\s*=)")
"""A comma that starts the next ``key=value``; other commas belong to the value (``recipe_types=Q4_K,Q6_K``)."""


def parse_options(spec: str | None) -> dict[str, str]:
    """``"imatrix=true,pure=false"`` → ``{"imatrix": "true", "pure": "false"}``; a value may hold commas
    (``"recipe_types=Q4_K,Q6_K,imatrix=true"`` → ``{"recipe_types": "Q4_K,Q6_K", "imatrix": "true"}``)."""
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in _NEXT_OPTION.split(spec or ""))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EdgeError(f"bad option '{item}': use key=value")
        options[key.strip().split(".", 1)[-1]] = value.strip()
    return options


def _optional_text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``''`` (an unset MLproject parameter) → ``None``."""
    return value if value is not None and str(value).strip() else None


def _optional_float(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``''`` (an unset MLproject parameter) → ``None``; else a float."""
    if value is None or not str(value).strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number") from None


def _settings(eval_text: str | None, window: int, windows: int, threads: int | None, repeats: int,
              reference_dtype: str = "auto"):
    from mlflow_edge.evaluation.data import evaluation_text
    from mlflow_edge.evaluation.harness import EvalSettings, default_threads

    return EvalSettings(text=evaluation_text(eval_text), window=window, windows=windows,
                        threads=threads or default_threads(), repeats=repeats, reference_dtype=reference_dtype)


_model = click.option("--model", default="demo", show_default=True,
                      help="source: 'demo', a Hugging Face id, a save_pretrained folder or a .gguf file")
_backend = click.option("--backend", default=None,
                        help="a registered backend (`mlflow-edge quant-types` lists them; default: the target's "
                             "first installed one)")
_target = click.option("--target", default="cpu", show_default=True, help="hardware target (see conventions)")
_experiment = click.option("--experiment", default=None, help="MLflow experiment (default: mlflow-edge)")
_gates = click.option("--gates", default=None, callback=_optional_text,
                      help="e.g. 'accuracy_retention>=0.95,kld_mean<=0.05,speedup>=2|compression_ratio>=2' "
                           "(default: the balanced fidelity preset, speed or size, latency_cv<=0.1)")
_policy = click.option("--policy", default="min:size_mb", show_default=True,
                       help="which feasible candidate becomes champion: min:size_mb (the smallest that passes the "
                            "gates), max:fidelity (the most faithful: lowest mean KLD, then retention), "
                            "max:/min:<metric>, or weighted:max:<metric>=<w>,min:<metric>=<w>,…; ties go to fidelity, "
                            "then decode speed, then size, and a dominated candidate never wins")
_fidelity = click.option("--fidelity", default=None, callback=_optional_text,
                         help="near-lossless|balanced|small: the preset of the fidelity gates (accuracy_retention, "
                              "kld_mean), replacing those of --gates")
_gate_confidence = click.option("--gate-confidence", default=None, callback=_optional_float,
                                help="decide fidelity gates on the bound of this confidence level (e.g. 0.95) "
                                     "instead of the point value")


def _eval_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--eval-text", default=None, help="evaluation text file (default: built-in WikiText-2 slice)"),
        click.option("--window", default=256, show_default=True, help="tokens per scored window"),
        click.option("--windows", default=16, show_default=True, help="number of windows"),
        click.option("--threads", default=None, type=int, help="runtime threads (default: all cores)"),
        click.option("--repeats", default=5, show_default=True, help="repeats of each timed request"),
        click.option("--reference-dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="dtype of the reference (the source in transformers): auto is float32 when it fits this "
                          "machine's memory, else the source's own 16-bit dtype"),
    ]):
        func = option(func)
    return func


STORE_COMMANDS = frozenset({"convert", "quantize", "evaluate", "promote", "main", "search", "sweep", "serve",
                            "monitor"})
"""The commands that use the MLflow tracking store: a tracking server must answer before they start."""


class _OneLineGroup(click.Group):
    """click's own refusals (a bad option value, a missing argument) as one line and exit 1, like every error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            click.echo(f"mlflow-edge: error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo("mlflow-edge: error: aborted", err=True)
            sys.exit(1)


@click.group(cls=_OneLineGroup)
@click.version_option(package_name="mlflow-edge")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Convert, quantize, evaluate and promote LLMs for edge hardware, tracked in MLflow."""
    if ctx.invoked_subcommand in STORE_COMMANDS:
        one_line_errors(check_tracking_server)()


def check_tracking_server(timeout_s: float = 5.0) -> None:
    """A tracking server (an http(s) tracking URI) must answer ``/health`` within ``timeout_s``: one attempt, so an
    unreachable one is a one-line error in seconds, not MLflow's minutes of retries. Its requests also retry less
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 2 unless set)."""
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    parts = urllib.parse.urlsplit(uri)
    shown = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()
    try:
        with urllib.request.urlopen(shown.rstrip("/") + "/health", timeout=timeout_s):  # no credentials needed
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy or an auth layer may refuse /health): MLflow's own calls will tell more
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EdgeError(f"cannot reach the MLflow tracking server at {shown}: {reason}") from None


@main.command()
@_model
@_backend
@click.option("--precision", default=None, help="conversion precision (default: the backend's base precision)")
@_target
@click.option("--output-dir", default=None, help="also copy the artifact here")
@_experiment
@one_line_errors
def convert(model: str, backend: str | None, precision: str | None, target: str, output_dir: str | None,
            experiment: str | None) -> None:
    """Convert a Hugging Face causal LM into the backend's format and log it as an MLflow model."""
    from mlflow_edge.workflow import run_convert

    click.echo(run_convert(model, backend, precision, target, output_dir, experiment))


@main.command()
@_model
@_backend
@click.option("--precision", default=None, callback=_optional_text,
              help="quantization type in the framework's own name (e.g. Q4_K_M); MIXED (the default with a recipe "
                   "or a budget): the recipe decides every tensor")
@click.option("--base-precision", default=None, help="precision quantization starts from (default: the backend's)")
@click.option("--options", default=None, help="backend options, e.g. 'imatrix=true,pure=true'")
@click.option("--recipe", default=None, callback=_optional_text,
              help="per-tensor types from a recipe file (one a budgeted quantization logged, or hand-written)")
@click.option("--target-bpw", default=None, callback=_optional_float,
              help="mixed precision within this many bits per weight, each backend choosing its layers' types "
                   "by its own method (its target_bpw option says which)")
@click.option("--target-size-mb", default=None, callback=_optional_float,
              help="like --target-bpw, for a model of this many MB")
@click.option("--calibration-text", default=None, help="calibration text file (default: built-in slice)")
@_target
@click.option("--output-dir", default=None, help="also copy the artifact here")
@_experiment
@one_line_errors
def quantize(model: str, backend: str | None, precision: str | None, base_precision: str | None,
             options: str | None, recipe: str | None, target_bpw: float | None, target_size_mb: float | None,
             calibration_text: str | None, target: str, output_dir: str | None, experiment: str | None) -> None:
    """Quantize a model with the backend's own quantizer and log it as an MLflow model."""
    from mlflow_edge.workflow import run_quantize

    chosen = _mixed_precision_options(recipe, target_bpw, target_size_mb)
    if precision is None and not chosen:
        raise EdgeError("give --precision (e.g. Q4_K_M), or --recipe, --target-bpw or --target-size-mb")
    click.echo(run_quantize(model, precision or "MIXED", backend, base_precision,
                            {**parse_options(options), **chosen}, target, output_dir, calibration_text, experiment))


def _mixed_precision_options(recipe: str | None, target_bpw: float | None,
                             target_size_mb: float | None) -> dict[str, Any]:
    """The backend options of ``quantize``'s mixed-precision flags (at most one of them)."""
    chosen = {"recipe": str(Path(recipe).resolve()) if recipe else None, "target_bpw": target_bpw,
              "target_size_mb": target_size_mb}
    given = {key: value for key, value in chosen.items() if value is not None}
    if len(given) > 1:
        raise EdgeError("give one of --recipe, --target-bpw and --target-size-mb")
    return given


@main.command()
@_model
@click.option("--artifact", "artifact_uri", required=True,
              help="logged model URI (models:/…, runs:/…) or a local model file or folder")
@_target
@_gates
@_eval_options
@_experiment
@one_line_errors
def evaluate(model: str, artifact_uri: str, target: str, gates: str | None, eval_text: str | None, window: int,
             windows: int, threads: int | None, repeats: int, reference_dtype: str, experiment: str | None) -> None:
    """Measure an artifact against its source model (the reference) and log the conventions' metrics."""
    from mlflow_edge.workflow import run_evaluate

    metrics = run_evaluate(model, artifact_uri, target, gates,
                           _settings(eval_text, window, windows, threads, repeats, reference_dtype), experiment)
    for name, value in sorted(metrics.items()):
        click.echo(f"{name}\t{value:.6g}")


@main.command()
@click.option("--experiment", default="mlflow-edge", show_default=True, help="experiment whose runs compete")
@_target
@_gates
@_policy
@click.option("--registered-model", required=True, help="registered model name")
@click.option("--study", default=None, help="only candidates of this study (parent run id)")
@click.option("--model", default=None,
              help="only candidates of this source model (name or sha256; default: the champion's, or the only one)")
@_fidelity
@_gate_confidence
@one_line_errors
def promote(experiment: str, target: str, gates: str | None, policy: str, registered_model: str,
            study: str | None, model: str | None, fidelity: str | None, gate_confidence: float | None) -> None:
    """Register the best gate-passing candidate and set the <target>-champion alias."""
    import mlflow

    from mlflow_edge import registry
    from mlflow_edge.gates import resolve_gates
    from mlflow_edge.runs import log_new_params, tracked_run
    from mlflow_edge.targets import get_target

    get_target(target)
    gate_spec = resolve_gates(gates, fidelity, gate_confidence)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise EdgeError(f"experiment not found: {experiment}")
    with tracked_run("promote", experiment):
        log_new_params({"target": target, "gates": str(gate_spec), "policy": policy,
                        "registered_model": registered_model})
        result = registry.promote([found.experiment_id], target, gate_spec, policy, registered_model, study, model)
        mlflow.set_tag("mlflow_edge.promotion", result.describe())
    click.echo(result.describe())


def _search_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        _model, _target,
        click.option("--backends", default=None,
                     help="comma-separated backends to search (default: every installed one the target recommends)"),
        click.option("--trials", default=8, show_default=True, help="trial budget (a resumed study runs what is left)"),
        click.option("--timeout", default=None, callback=_optional_float, help="time budget in seconds"),
        click.option("--objectives", default="multi", show_default=True,
                     help="'multi' (max decode_tok_s, min size_mb, max accuracy_retention) or max:/min:<metric>,…"),
        _gates, _fidelity, _gate_confidence,
        _policy,
        click.option("--seed", default=0, show_default=True),
        click.option("--storage", default=None, help="Optuna storage URL (default: optuna.db beside the MLflow store)"),
        click.option("--study-name", default=None, help="Optuna study name (default: <source>-<target>)"),
        click.option("--worker", is_flag=True, default=False,
                     help="join the study a coordinator (this command without --worker, same --storage) started and "
                          "run its trials; settings, gates and budget are the coordinator's"),
        click.option("--coordinate-only", is_flag=True, default=False,
                     help="run no trial here: workers on the target's hardware (--worker, same --storage) measure "
                          "them; the default when this machine lacks that hardware and --storage is given"),
        click.option("--registered-model", default=None, help="registered model name (default: <source>-edge)"),
        click.option("--calibration-text", default=None, help="calibration text file (default: built-in slice)"),
        click.option("--accuracy-only", type=click.BOOL, default=False, show_default=True,
                     help="true: measure accuracy and size only (for a target whose hardware this machine lacks)"),
        click.option("--screen-windows", default=None, type=int,
                     help="windows of the cheap first accuracy check that can prune a trial "
                          "(default: windows/4; 0: off)"),
        click.option("--prune-margin", default=0.02, show_default=True,
                     help="prune only when the first windows miss a gate by more than this (relative)"),
        _eval_options, _experiment, one_line_errors,
    ]):
        func = option(func)
    return func


def _search(run_name: str, model: str, target: str, backends: str | None, trials: int, timeout: float | None,
            objectives: str, gates: str | None, fidelity: str | None, gate_confidence: float | None, policy: str,
            seed: int, storage: str | None, study_name: str | None, worker: bool, coordinate_only: bool,
            registered_model: str | None, calibration_text: str | None, accuracy_only: bool,
            screen_windows: int | None, prune_margin: float, eval_text: str | None, window: int, windows: int,
            threads: int | None, repeats: int, reference_dtype: str, experiment: str | None) -> None:
    from mlflow_edge.search import SearchConfig, run_search

    if worker:
        return _work(model, target, storage, study_name, timeout)

    result = run_search(SearchConfig(
        model, target, trials, timeout, objectives, gates, policy, seed, storage, study_name,
        registered_model=registered_model or None,
        settings=_settings(eval_text, window, windows, threads, repeats, reference_dtype),
        calibration_path=calibration_text, experiment=experiment, accuracy_only=accuracy_only,
        screen_windows=screen_windows, prune_margin=prune_margin, run_name=run_name, fidelity=fidelity,
        gate_confidence=gate_confidence, coordinate_only=True if coordinate_only else None,
        backends=[b.strip() for b in (backends or "").split(",") if b.strip()] or None))
    click.echo(f"study {result['study']}: {result['trials']} trials ({result['new_trials']} new), "
               f"{len(result['pareto'])} on the Pareto front")
    click.echo(result["promotion"])


def _work(model: str, target: str, storage: str | None, study_name: str | None, timeout: float | None) -> None:
    """``search --worker``: join a coordinator's study on a shared storage."""
    from mlflow_edge.search.study import run_worker
    from mlflow_edge.sources import resolve_source

    if not storage:
        raise EdgeError("--worker needs the coordinator's --storage (e.g. postgresql://user@host/optuna)")
    name = study_name or f"{resolve_source(model).name}-{target}"
    result = run_worker(storage, name, target, timeout)
    click.echo(f"worker of study {result['study']}: ran trial(s) {', '.join(map(str, result['trials'])) or 'none'}")


@main.command("main")
@_search_options
def main_flow(**kwargs: Any) -> None:
    """The whole flow: convert for each of the target's backends, Optuna search, promotion of the best."""
    _search("main", **kwargs)


@main.command()
@_search_options
def search(**kwargs: Any) -> None:
    """Optuna search over the target's backends and their quantization options, then promotion."""
    _search("search", **kwargs)


@main.command()
@_model
@_backend
@click.option("--types", default=None, help="comma-separated quantization types (default: the backend's sweep)")
@click.option("--base-precision", default=None, help="precision quantization starts from (default: the backend's)")
@click.option("--options", default=None, help="backend options for every type, e.g. 'imatrix=true'")
@click.option("--calibration-text", default=None, help="calibration text file (default: built-in slice)")
@_target
@_gates
@_policy
@click.option("--registered-model", default=None, help="registered model name (default: <source>-edge)")
@_eval_options
@_experiment
@one_line_errors
def sweep(model: str, backend: str | None, types: str | None, base_precision: str | None, options: str | None,
          calibration_text: str | None, target: str, gates: str | None, policy: str, registered_model: str | None,
          eval_text: str | None, window: int, windows: int, threads: int | None, repeats: int,
          reference_dtype: str, experiment: str | None) -> None:
    """A fixed grid: convert, every given quantization type, evaluation against the reference, promotion."""
    from mlflow_edge.workflow import run_sweep

    grid = tuple(t.strip() for t in types.split(",") if t.strip()) if types else None
    result = run_sweep(model, backend, grid, base_precision, parse_options(options), target, gates, policy,
                       registered_model, _settings(eval_text, window, windows, threads, repeats, reference_dtype),
                       calibration_text, experiment)
    click.echo(result.describe())


@main.command()
@click.option("--target", default=None, help="show the recommended backends for this target only")
@click.option("--model", default=None, help="also say which installed backends can convert this source model")
@one_line_errors
def targets(target: str | None, model: str | None) -> None:
    """List hardware targets, whether this machine can measure them, and the backends to use."""
    import pandas as pd

    from mlflow_edge.search.space import backends_for, backends_for_model
    from mlflow_edge.targets import TARGETS, get_target, is_measurable, recommended_backends

    chosen = [get_target(target)] if target else list(TARGETS.values())
    source = None
    if model:
        from mlflow_edge.sources import resolve_source

        source = resolve_source(model)
    rows = []
    for t in chosen:
        installed = backends_for(t.name)
        row = {
            "target": t.name,
            "measurable_here": is_measurable(t),
            "backends": " > ".join(recommended_backends(t)),
            "installed": ", ".join(installed) or "-",
        }
        if source is not None:
            row[f"for {source.name}"] = ", ".join(backends_for_model(installed, source)[0]) or "-"
        row.update(needs=t.requires, notes=t.notes)
        rows.append(row)
    click.echo(pd.DataFrame(rows).to_string(index=False))


@main.command("quant-types")
@click.option("--backend", default=None, help="one backend (default: every registered one)")
@one_line_errors
def quant_types(backend: str | None) -> None:
    """List the quantization types and options of the registered backends."""
    from mlflow_edge.backends import backend_names, get_backend

    for name in [backend] if backend else backend_names():
        impl = get_backend(name)
        click.echo(f"[{name}] format {impl.format}, flavor {impl.flavor}")
        try:
            click.echo("convert: " + " ".join(impl.convert_precisions()))
            click.echo("quantize: " + " ".join(impl.quantize_precisions()))
        except EdgeError as exc:  # the framework is not installed: say so and go on with the others
            if backend:
                raise
            click.echo(f"not installed: {exc}")
            continue
        for spec in impl.option_specs():
            click.echo(f"option {name}.{spec.name} ({spec.type.__name__}, default {spec.default}): {spec.help}")


@main.command()
@click.argument("model_uri")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (loopback by default)")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--poll-interval", default=30.0, show_default=True, type=float,
              help="seconds between checks of the alias (models:/<name>@<alias>); SIGHUP checks at once")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(1),
              help="the most tokens one request may generate")
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(1),
              help="the longest prompt in tokens (default: the model's context less one)")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(1),
              help="requests queued or running before the server answers 429")
@one_line_errors
def serve(model_uri: str, host: str, port: int, poll_interval: float, max_tokens: int,
          max_prompt_tokens: int | None, max_queue: int) -> None:
    """Serve MODEL_URI (models:/<name>@<alias>, models:/<name>/<version>, runs:/…, a model folder) over an
    OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics."""
    from mlflow_edge.serving import Limits
    from mlflow_edge.serving import serve as run_server

    if poll_interval <= 0:
        raise EdgeError(f"--poll-interval must be positive, got {poll_interval}")
    run_server(model_uri, host, port, Limits(max_tokens, max_prompt_tokens, max_queue), poll_interval)


@main.command()
@click.option("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
@click.option("--interval", default=30.0, show_default=True, type=float, help="seconds per logged window")
@click.option("--windows", default=0, show_default=True, type=click.IntRange(0),
              help="windows to log before stopping (0: until interrupted)")
@click.option("--max-error-rate", default=0.01, show_default=True, type=click.FloatRange(0, 1))
@_experiment
@one_line_errors
def monitor(url: str, interval: float, windows: int, max_error_rate: float, experiment: str | None) -> None:
    """Log a running server's latency, TTFT, tokens/s and error rate to an MLflow run linked to the served version;
    tag the version and print one line when a window breaches the gates it was promoted under."""
    from mlflow_edge.serving.monitor import monitor as run_monitor

    if interval <= 0:
        raise EdgeError(f"--interval must be positive, got {interval}")
    run_id = run_monitor(url, interval, windows, max_error_rate, experiment)
    click.echo(f"monitor run {run_id}")


@main.group("cache")
def cache_group() -> None:
    """The content-addressed cache ($MLFLOW_EDGE_CACHE): list its entries, prune them. Its size limit is
    $MLFLOW_EDGE_CACHE_MAX_GB (GB), held after every build."""


@cache_group.command("list")
@click.option("--kind", default=None, help="only entries of this kind (the cache's first-level folder)")
@one_line_errors
def cache_list(kind: str | None) -> None:
    """The cache's entries, least recently used (the first to be evicted) first, and their total."""
    from mlflow_edge import cache

    limit = cache.size_limit()
    listed = [entry for entry in cache.entries() if kind in (None, entry.kind)]
    rows = [("kind", "digest", "size", "last used", "in use")]
    rows += [(entry.kind, entry.digest[:12], cache.human_size(entry.size_bytes), _when(entry.last_used),
              cache.busy(entry) or "no") for entry in listed]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    total = sum(entry.size_bytes for entry in listed)
    shown = f" (limit {cache.human_size(limit)}, {cache.MAX_GB_ENV})" if limit is not None else ""
    click.echo(f"total: {cache.entry_count(len(listed))}, {cache.human_size(total)}{shown} in {cache.cache_root()}")


@cache_group.command("prune")
@click.option("--max-gb", default=None, type=float,
              help="evict the least recently used entries until the cache holds at most this many GB (default: "
                   "$MLFLOW_EDGE_CACHE_MAX_GB; 0 evicts every entry that may go)")
@click.option("--kind", default=None, help="evict entries of this kind only (with no limit and no age: all of them)")
@click.option("--older-than-days", default=None, type=float, help="evict entries last used more than this long ago")
@click.option("--dry-run", is_flag=True, default=False, help="say what would be evicted, remove nothing")
@one_line_errors
def cache_prune(max_gb: float | None, kind: str | None, older_than_days: float | None, dry_run: bool) -> None:
    """Evict cache entries by size, kind or age, least recently used first, never one in use by a live process or
    being built; print each one and the space freed."""
    from mlflow_edge import cache

    limit = _prune_limit(max_gb, kind, older_than_days)
    pruned = cache.prune(limit, kind=kind, older_than_s=None if older_than_days is None else older_than_days * 86400,
                         dry_run=dry_run)
    for entry in pruned.evicted:
        click.echo(f"{'would evict' if dry_run else 'evicted'} {entry.kind}/{entry.digest[:12]} "
                   f"({cache.human_size(entry.size_bytes)}, last used {_when(entry.last_used)})")
    for entry, reason in pruned.kept:
        click.echo(f"kept {entry.kind}/{entry.digest[:12]} ({cache.human_size(entry.size_bytes)}): {reason}")
    click.echo(f"{'would free' if dry_run else 'freed'} {cache.human_size(pruned.freed_bytes)} in "
               f"{cache.entry_count(len(pruned.evicted))}; the cache {'would hold' if dry_run else 'holds'} "
               f"{cache.human_size(pruned.total_bytes)}")


def _prune_limit(max_gb: float | None, kind: str | None, older_than_days: float | None) -> int | None:
    """The size limit of ``cache prune`` in bytes (``--max-gb``, else ``$MLFLOW_EDGE_CACHE_MAX_GB``), once its
    criteria are checked: numbers 0 or more, at least one criterion, a kind the cache holds."""
    from mlflow_edge import cache

    for name, value in (("--max-gb", max_gb), ("--older-than-days", older_than_days)):
        if value is not None and not 0 <= value < float("inf"):
            raise EdgeError(f"{name} must be a number, 0 or more, got {value}")
    limit = round(max_gb * 1e9) if max_gb is not None else cache.size_limit()
    if limit is None and older_than_days is None and kind is None:
        raise EdgeError(f"say what to prune: --max-gb, --older-than-days or --kind (or set {cache.MAX_GB_ENV})")
    kinds = sorted({entry.kind for entry in cache.entries()})
    if kind is not None and kind not in kinds:
        raise EdgeError(f"no cache entries of kind {kind!r} in {cache.cache_root()} "
                        f"(kinds: {', '.join(kinds) or 'none'})")
    return limit


def _when(epoch_s: float) -> str:
    """A moment in local time, to the minute."""
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch_s))


main.add_command(azureml)

if __name__ == "__main__":
    main()
