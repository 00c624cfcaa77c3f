"""The pick a user would make: the Optuna search's llama.cpp champion against a type-by-type scan with llama.cpp's own
tools (issue "The pick a user would make", part 4).

Models: **demo** (SmolLM2-135M, ``resolve_source("demo")``) and **noisy**, a copy built in the scratch folder with
Gaussian noise of ``--noise`` (default 0.07) × each matrix's standard deviation added to every 2-D weight matrix
(embeddings included, norms and biases not), seeded by ``--seed``: a model that sits on no quantization grid. Each
model is its own reference. For every (model, ``--presets`` fidelity preset of ``mlflow_edge.gates.FIDELITY_PRESETS``)
case, two ways to the smallest llama.cpp artifact that keeps the preset's fidelity:

1. **the search**: ``mlflow-edge search --target cpu --backends llamacpp --fidelity <preset> --trials N --seed S``
   as a subprocess of the venv's CLI, in a scratch folder with its own sqlite MLflow store, ``optuna.db`` and
   ``MLFLOW_EDGE_CACHE`` (linking only the sources, downloads and the llama.cpp base conversion of the normal cache:
   no quantization, importance matrix or reference measurement is reused), ``--threads 1``. Read back: each candidate
   run's wall time (MLflow start/end; a run reopened afterwards to store its model ends later, so the trial's end is
   Optuna's ``datetime_complete``), the registered model's ``cpu-champion`` and its run's metrics, the time from the
   subprocess start to the end of the champion's trial (``time_to_champion_s``), and the whole search's wall time.
2. **the scan**: ``llama-quantize``, ``llama-perplexity`` and ``llama-bench`` built once (cmake, ``GGML_NATIVE``,
   static) from the vendored llama.cpp of the hash-pinned llama-cpp-python sdist into
   ``<cache>/llama-tools/<version>-<cpu flags hash>``. On the same f16 GGUF the search starts from
   (``artifacts.convert(source, "llamacpp")``): ``llama-perplexity --kl-divergence-base`` once on f16, then for each
   type from 8 bits down (Q8_0 … Q2_K): quantize, ``llama-perplexity --kl-divergence`` (``-c`` the harness's window,
   ``--chunks`` = ``--windows``, on the harness's evaluation text) and ``llama-bench -t 1 -p 0 -n 32 -r 3``. Gates:
   the preset's ``kld_mean`` ("Mean KLD") and ``accuracy_retention`` = PPL(f16) / PPL(type), the harness's
   reference/candidate ratio with f16 as the reference. **Reading of "scan from 8 bits down"**: a user who wants the
   smallest artifact that keeps a fidelity gate steps down until a type FAILS and keeps the one before it, so the
   scan's pick is the last passing type before the first failure (none when Q8_0 fails), and the scan's wall time
   is the base logits plus every type measured up to and including that first failure (when the pick is known).
   Each type is measured once per model and its cost counted in every preset's scan that reaches it.

Goals per case: the champion passes ``resolve_gates(None, fidelity=preset)`` on its own run's metrics; it is no larger
(``size_mb`` ≤ the pick's × 1.02) and no less faithful (``kld_mean`` ≤ the pick's × 1.10 + 0.002: the search's KLD is
the harness's against the fp32 ``transformers`` model, the scan's llama-perplexity's against the f16 GGUF, so the two
tools differ slightly); and ``time_to_champion_s`` ≤ 1.0 × the scan's wall time. The whole search's wall time is
reported beside it. Untimed on both sides: the tool build and the f16 conversion. Quantization runs on the tools'
default threads on both sides (llama.cpp's ``nthread`` 0 in the search); evaluation and decode on 1 thread.

Output: JSON lines on stdout (progress on stderr): ``{"setup"}``, ``{"model", "scan_type", …}`` per measured type,
``{"model", "preset", "search", "scan", "goals", "meets"}`` per case, and the verdict
``{"benchmark": "search_vs_scan", "verdict": "meets" | "misses", "misses": […]}``. Run::

    .venv/bin/python benchmarks/search_vs_scan.py                                   # 2 models × 3 presets, 8 trials
    .venv/bin/python benchmarks/search_vs_scan.py --models demo --presets balanced --scan-only      # the scan alone
    .venv/bin/python benchmarks/search_vs_scan.py --models demo --presets balanced --trials 4 --windows 8
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SCAN_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
"""llama.cpp's file types from 8 bits down, in the order a user steps through them."""
TOOLS = ("llama-quantize", "llama-perplexity", "llama-bench")
SIZE_SLACK = 1.02
KLD_SLACK, KLD_ABS = 1.10, 0.002
TIME_GOAL = 1.0
LINKED_CACHE_ENTRIES = ("demo", "downloads", "wheels", "sdist", "sources", "llama.cpp-scripts", "convert-llamacpp")
"""Normal-cache entries the search's fresh cache links: sources, downloads, converter scripts, base conversions."""
CHAMPION_METRICS = ("size_mb", "bits_per_weight", "kld_mean", "kld_mean_lo", "kld_mean_hi", "accuracy_retention",
                    "perplexity", "decode_tok_s", "latency_cv", "compression_ratio", "speedup")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def progress(message: str) -> None:
    print(f"[search_vs_scan {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# -- the models ----------------------------------------------------------------------------------------------------
def add_noise(source: Any, folder: Path, fraction: float, seed: int) -> Any:
    """A copy of ``source`` in ``folder`` with N(0, (fraction · std of the matrix)²) added to every 2-D weight matrix
    (one seeded generator, tensors in name order): the noisy model, its own reference."""
    import torch
    from safetensors.torch import load_file, save_file

    from mlflow_edge.sources import from_folder

    folder.mkdir(parents=True)
    for path in Path(source.path).iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith(".") \
                and path.name != "key.json":
            shutil.copyfile(path, folder / path.name)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(Path(source.path).glob("*.safetensors")):
        tensors = load_file(str(path))
        for name in sorted(tensors):
            matrix = tensors[name]
            if matrix.ndim != 2 or not matrix.is_floating_point():
                continue
            values = matrix.float()
            noise = torch.randn(values.shape, generator=generator) * (fraction * values.std())
            tensors[name] = (values + noise).to(matrix.dtype)
        save_file(tensors, str(folder / path.name), metadata={"format": "pt"})
    return from_folder(folder)


# -- llama.cpp's own tools -----------------------------------------------------------------------------------------
def cpu_flags_digest() -> str:
    """A short hash of this CPU's flags: a ``GGML_NATIVE`` build is only valid on a CPU with the same flags."""
    flags = ""
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def unpack_vendored_source(version: str, folder: Path) -> Path:
    """``vendor/llama.cpp`` of the pinned llama-cpp-python sdist (the one the converter comes from) in ``folder``."""
    from mlflow_edge.backends.llamacpp import SDIST_SHA256
    from mlflow_edge.sources import pinned_download

    if version not in SDIST_SHA256:
        raise SystemExit(f"no pinned sdist hash for llama-cpp-python {version} (known: {', '.join(SDIST_SHA256)})")
    sdist = pinned_download(f"llama-cpp-python=={version}", f"llama_cpp_python-{version}.tar.gz",
                            SDIST_SHA256[version], binary=False)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(folder, members=members, filter="data")
    return folder


def build_tools(source_dir: Path, build_dir: Path, bin_dir: Path) -> None:
    """cmake-build :data:`TOOLS` (static, native) from ``source_dir``; copy the binaries into ``bin_dir``."""
    configure = ["cmake", "-S", str(source_dir), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DBUILD_SHARED_LIBS=OFF"]  # static: the binaries survive the rename of their build folder
    build = ["cmake", "--build", str(build_dir), "-j2", "--target", *TOOLS]
    for command in (configure, build):
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"building llama.cpp's tools failed ({command[1]}): {tail(proc.stdout + proc.stderr)}")
    bin_dir.mkdir(parents=True)
    for tool in TOOLS:
        shutil.copy2(build_dir / "bin" / tool, bin_dir / tool)


def tools_dir() -> Path:
    """``<cache>/llama-tools/<version>-<cpu flags hash>/bin``, built once: into a temporary folder beside the entry,
    marked complete, renamed under a lock; a half-built folder (a killed build) is never used and is removed by the
    next build."""
    from mlflow_edge import cache

    version = llama_cpp_version()
    base = cache.subfolder("llama-tools")
    final = base / f"{version}-{cpu_flags_digest()}"
    if (final / ".complete").is_file():
        return final / "bin"
    with cache.file_lock(base / f"{final.name}.lock"):
        if (final / ".complete").is_file():
            return final / "bin"
        for stale in base.glob(f".{final.name}.build-*"):  # we hold the lock: no other build is running
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{final.name}.build-"))
        try:
            progress(f"building {', '.join(TOOLS)} of llama.cpp (llama-cpp-python {version}) once, a few minutes")
            source_dir = unpack_vendored_source(version, tmp / "src")
            build_tools(source_dir, tmp / "build", tmp / "entry" / "bin")
            (tmp / "entry" / ".complete").write_text(json.dumps({"llama_cpp_python": version}))
            shutil.rmtree(final, ignore_errors=True)
            (tmp / "entry").rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "bin"


def run_tool(command: list[str]) -> str:
    """Run a llama.cpp tool: its stdout and stderr together; ``RuntimeError`` with its last lines when it fails."""
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} exited {proc.returncode}: {tail(proc.stdout)}")
    return proc.stdout


# -- the scan ------------------------------------------------------------------------------------------------------
def read_float(pattern: str, text: str, what: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"llama-perplexity printed no {what}: {tail(text)}")
    return float(match.group(1))


class Scan:
    """One model's type-by-type measurements with llama.cpp's tools, each type measured at most once and shared by
    the presets' scans."""

    def __init__(self, model: str, tools: Path, f16: Path, folder: Path, window: int, windows: int) -> None:
        from mlflow_edge.evaluation.data import evaluation_text

        self.model, self.tools, self.f16, self.folder = model, tools, f16, folder
        self.context = ["-c", str(window), "--chunks", str(windows), "-t", "1"]
        folder.mkdir(parents=True)
        self.text = folder / "eval.txt"
        self.text.write_text(evaluation_text().text(), encoding="utf-8")
        self.logits = folder / "f16.kld"
        start = time.perf_counter()
        progress(f"{model}: f16 logits (llama-perplexity --kl-divergence-base)")
        run_tool([str(tools / "llama-perplexity"), "-m", str(f16), "-f", str(self.text), *self.context,
                  "--kl-divergence-base", str(self.logits)])
        self.base_s = time.perf_counter() - start
        self.measured: dict[str, dict[str, Any]] = {}

    def measure(self, qtype: str) -> dict[str, Any]:
        if qtype not in self.measured:
            self.measured[qtype] = self._measure(qtype)
            emit({"model": self.model, "scan_type": qtype, **self.measured[qtype]})
        return self.measured[qtype]

    def _measure(self, qtype: str) -> dict[str, Any]:
        """Quantize, KLD/perplexity against the f16 logits, decode speed; ``error`` when a tool fails."""
        progress(f"{self.model}: scan {qtype}")
        gguf = self.folder / f"{qtype}.gguf"
        start = time.perf_counter()
        try:
            run_tool([str(self.tools / "llama-quantize"), str(self.f16), str(gguf), qtype])
            fidelity = kld_and_perplexity(run_tool([
                str(self.tools / "llama-perplexity"), "-m", str(gguf), *self.context,
                "--kl-divergence-base", str(self.logits), "--kl-divergence"]))
            decode = decode_speed(run_tool([str(self.tools / "llama-bench"), "-m", str(gguf), "-t", "1", "-p", "0",
                                            "-n", "32", "-r", "3", "-o", "json"]))
        except RuntimeError as exc:
            return {"error": str(exc), "wall_s": round(time.perf_counter() - start, 1)}
        finally:
            size_mb = gguf.stat().st_size / 1e6 if gguf.is_file() else None
            gguf.unlink(missing_ok=True)
        return {"size_mb": size_mb, **fidelity, "decode_tok_s": decode,
                "wall_s": round(time.perf_counter() - start, 1)}

    def pick(self, preset: str) -> dict[str, Any]:
        """The preset's scan: step down :data:`SCAN_TYPES` until one fails its gates; keep the one before."""
        from mlflow_edge.gates import FIDELITY_PRESETS, parse_gates

        gates = parse_gates(FIDELITY_PRESETS[preset])
        picked, steps, wall = None, [], self.base_s
        for qtype in SCAN_TYPES:
            record = self.measure(qtype)
            wall += record["wall_s"]
            passed = "error" not in record and gates.check(record).passed
            steps.append({"type": qtype, "passed": passed})
            if not passed:
                break
            picked = qtype
        return {"gates": str(gates), "pick": picked, "pick_metrics": self.measured.get(picked),
                "stopped_at": None if steps[-1]["passed"] else steps[-1]["type"], "steps": steps,
                "base_logits_s": round(self.base_s, 1), "wall_s": round(wall, 1)}


def kld_and_perplexity(output: str) -> dict[str, float]:
    """Mean KLD, PPL(Q), PPL(base) from ``llama-perplexity --kl-divergence``; retention = PPL(base) / PPL(Q)."""
    number = r"\s*:\s*([0-9.eE+-]+)"
    ppl = read_float(r"Mean PPL\(Q\)" + number, output, "Mean PPL(Q)")
    ppl_base = read_float(r"Mean PPL\(base\)" + number, output, "Mean PPL(base)")
    return {"kld_mean": read_float(r"Mean\s+KLD" + number, output, "Mean KLD"), "perplexity": ppl,
            "perplexity_f16": ppl_base, "accuracy_retention": ppl_base / ppl}


def decode_speed(bench_json: str) -> float:
    """tokens/s of llama-bench's generation test (``avg_ts``) from its JSON output."""
    try:
        rows = json.loads(bench_json[bench_json.index("["): bench_json.rindex("]") + 1])
        return float(next(r["avg_ts"] for r in rows if r.get("n_gen", 0) > 0))
    except (ValueError, StopIteration, KeyError) as exc:
        raise RuntimeError(f"llama-bench printed no generation speed: {tail(bench_json)}") from exc


# -- the search ----------------------------------------------------------------------------------------------------
def search_environment(folder: Path, user_cache: Path) -> dict[str, str]:
    """The search's environment: sqlite MLflow store in ``folder`` and a fresh cache linking
    :data:`LINKED_CACHE_ENTRIES` of ``user_cache``."""
    cache = folder / "cache"
    cache.mkdir(parents=True)
    for name in LINKED_CACHE_ENTRIES:
        if (user_cache / name).exists():
            (cache / name).symlink_to(user_cache / name, target_is_directory=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return {**os.environ, "MLFLOW_EDGE_CACHE": str(cache), "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}


def run_search_cli(args: argparse.Namespace, model_arg: str, preset: str, folder: Path,
                   user_cache: Path) -> dict[str, Any]:
    """``mlflow-edge search`` in a subprocess; its names, command, exit status, start time and wall time."""
    tag = f"{preset}-{uuid.uuid4().hex[:8]}"
    names = {"study_name": f"svs-{tag}", "registered_model": f"svs-{tag}-edge",
             "storage": f"sqlite:///{folder / 'optuna.db'}", "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"}
    env = search_environment(folder, user_cache)
    command = [str(Path(sys.executable).with_name("mlflow-edge")), "search", "--model", model_arg, "--target", "cpu",
               "--backends", "llamacpp", "--fidelity", preset, "--trials", str(args.trials), "--seed", str(args.seed),
               "--study-name", names["study_name"], "--registered-model", names["registered_model"],
               "--storage", names["storage"], "--windows", str(args.windows), "--threads", "1"]
    progress(f"search: {' '.join(command[1:])}")
    started = time.time()
    proc = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          check=False)
    wall = time.time() - started
    (folder / "search.log").write_text(proc.stdout + proc.stderr)
    return {**names, "command": command, "returncode": proc.returncode, "started": started, "wall_s": round(wall, 1),
            "stdout_tail": tail(proc.stdout, 2), "stderr_tail": tail(proc.stderr) if proc.returncode else None}


def optuna_trials(storage: str, study_name: str) -> dict[str, dict[str, Any]]:
    """Each Optuna trial of the study keyed by its MLflow run id: number, state, start and completion (epoch s)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage)
    found = {}
    for trial in study.trials:
        run_id = trial.user_attrs.get("run_id")
        if run_id:
            found[run_id] = {"number": trial.number, "state": trial.state.name,
                             "precision": trial.user_attrs.get("precision"), "start": epoch(trial.datetime_start),
                             "complete": epoch(trial.datetime_complete)}
    return found


def epoch(moment: datetime.datetime | None) -> float | None:
    """Optuna's naive local datetimes as epoch seconds."""
    return None if moment is None else moment.timestamp()


def candidate_trials(client: Any, started: float, by_run: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per candidate run: trial, precision, options, the run's MLflow start and wall time, and the trial's
    Optuna wall time and end (else the run's end), in seconds from the search's start. A run reopened after the
    search to store its model ends late in MLflow (``run_wall_s`` > ``trial_wall_s``)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`mlflow_edge.role` = 'candidate'", max_results=1000)
    trials = []
    for run in runs:
        info, optuna_trial = run.info, by_run.get(run.info.run_id, {})
        begin, complete = optuna_trial.get("start"), optuna_trial.get("complete")
        end = complete or (info.end_time / 1000 if info.end_time else None)
        trials.append({
            "trial": optuna_trial.get("number", run.data.tags.get("mlflow_edge.trial")),
            "run_id": info.run_id, "status": info.status, "optuna_state": optuna_trial.get("state"),
            "precision": run.data.params.get("precision") or optuna_trial.get("precision"),
            "options": {k: v for k, v in run.data.params.items() if k.startswith("llamacpp.")},
            "size_mb": run.data.metrics.get("size_mb"), "kld_mean": run.data.metrics.get("kld_mean"),
            "start_s": round(info.start_time / 1000 - started, 1),
            "run_wall_s": round((info.end_time - info.start_time) / 1000, 1) if info.end_time else None,
            "trial_wall_s": round(complete - begin, 1) if begin and complete else None,
            "end_s": None if end is None else round(end - started, 1)})
    return sorted(trials, key=lambda t: t["start_s"])


def champion(client: Any, registered_model: str) -> dict[str, Any] | None:
    """The ``cpu-champion`` version's run: id, version, its precision params and metrics; ``None`` when none."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(registered_model, "cpu-champion")
    except MlflowException:
        return None
    run_id = version.tags.get("mlflow_edge.run_id") or version.run_id
    run = client.get_run(run_id)
    return {"run_id": run_id, "version": version.version, "metrics": dict(run.data.metrics),
            "precision": run.data.params.get("precision"),
            "options": {k: v for k, v in run.data.params.items() if k.startswith("llamacpp.")}}


def read_search(launched: dict[str, Any], preset: str) -> dict[str, Any]:
    """What the finished search left in its stores: trials, champion, time to champion, gates on the champion."""
    from mlflow import MlflowClient

    from mlflow_edge.gates import resolve_gates

    client = MlflowClient(tracking_uri=launched["tracking_uri"], registry_uri=launched["tracking_uri"])
    try:
        by_run = optuna_trials(launched["storage"], launched["study_name"])
    except Exception as exc:  # a search that failed early may have left no study
        by_run = {}
        launched["optuna_error"] = f"{type(exc).__name__}: {exc}"
    trials = candidate_trials(client, launched["started"], by_run)
    best = champion(client, launched["registered_model"])
    record = {k: v for k, v in launched.items() if k not in ("started", "tracking_uri", "storage")}
    record.update(trials=trials, champion=None, time_to_champion_s=None, champion_gates=None)
    if best is None:
        record["champion"] = "none promoted (no feasible trial)"
        return record
    trial = next((t for t in trials if t["run_id"] == best["run_id"]), None)
    report = resolve_gates(None, fidelity=preset).check(best["metrics"])
    record.update(champion={**{k: best[k] for k in ("run_id", "version", "precision", "options")},
                            "trial": None if trial is None else trial["trial"],
                            **{k: best["metrics"].get(k) for k in CHAMPION_METRICS}},
                  time_to_champion_s=None if trial is None else trial["end_s"],
                  champion_gates={"passed": report.passed, "describe": report.describe()})
    return record


# -- comparing -----------------------------------------------------------------------------------------------------
def goals(search: dict[str, Any], scan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal's values and outcome (``ok`` None: not applicable, the scan picked nothing)."""
    best, pick = search["champion"], scan["pick_metrics"]
    if not isinstance(best, dict):
        return {"champion": {"ok": False, "value": best}}
    found = {"meets_gates": {"ok": search["champion_gates"]["passed"], "value": search["champion_gates"]["describe"]}}
    if pick is None:
        note = "the scan picked no type (its first type failed)"
        return {**found, **{k: {"ok": None, "note": note} for k in ("no_larger", "no_less_faithful", "time")}}
    size_limit = pick["size_mb"] * SIZE_SLACK
    kld_limit = pick["kld_mean"] * KLD_SLACK + KLD_ABS
    time_limit = scan["wall_s"] * TIME_GOAL
    to_champion = search["time_to_champion_s"]
    found["no_larger"] = {"value": best["size_mb"], "limit": size_limit,
                          "ok": best["size_mb"] is not None and best["size_mb"] <= size_limit}
    found["no_less_faithful"] = {"value": best["kld_mean"], "limit": kld_limit,
                                 "ok": best["kld_mean"] is not None and best["kld_mean"] <= kld_limit}
    found["time"] = {"value": to_champion, "limit": time_limit,
                     "ok": to_champion is not None and to_champion <= time_limit}
    return found


def scan_summary(scan: dict[str, Any]) -> dict[str, Any]:
    pick = scan["pick_metrics"] or {}
    return {**{k: v for k, v in scan.items() if k != "pick_metrics"},
            **{f"pick_{k}": pick.get(k) for k in ("size_mb", "kld_mean", "accuracy_retention", "decode_tok_s")}}


def run_case(args: argparse.Namespace, model: str, model_arg: str, preset: str, scan: Scan, scratch: Path,
             user_cache: Path) -> dict[str, Any]:
    progress(f"{model} / {preset}: the scan")
    scanned = scan.pick(preset)
    record: dict[str, Any] = {"model": model, "preset": preset, "scan": scan_summary(scanned)}
    if args.scan_only:
        return {**record, "search": None, "goals": None, "meets": None}
    folder = scratch / f"search-{model}-{preset}"
    folder.mkdir()
    search = read_search(run_search_cli(args, model_arg, preset, folder, user_cache), preset)
    checks = goals(search, scanned)
    return {**record, "summary": case_summary(search, scanned), "search": search, "goals": checks,
            "meets": all(c["ok"] is not False for c in checks.values())}


def case_summary(search: dict[str, Any], scan: dict[str, Any]) -> dict[str, Any]:
    """Both sides in one line: what each picked, its size and KLD, and how long it took."""
    best = search["champion"] if isinstance(search["champion"], dict) else {}
    pick = scan["pick_metrics"] or {}
    return {"search_pick": best.get("precision"), "search_size_mb": best.get("size_mb"),
            "search_kld_mean": best.get("kld_mean"), "time_to_champion_s": search["time_to_champion_s"],
            "search_wall_s": search["wall_s"], "scan_pick": scan["pick"], "scan_size_mb": pick.get("size_mb"),
            "scan_kld_mean": pick.get("kld_mean"), "scan_wall_s": scan["wall_s"],
            "dominated_by_scan_pick": _dominated(best, pick)}


def _dominated(best: dict[str, Any], pick: dict[str, Any]) -> bool | None:
    """Whether the scan's pick is at least as small and as faithful as the champion and better on one (the goals ask
    more: that the champion be no larger and no less faithful than the pick)."""
    keys = ("size_mb", "kld_mean")
    if any(best.get(k) is None or pick.get(k) is None for k in keys):
        return None
    return all(pick[k] <= best[k] for k in keys) and any(pick[k] < best[k] for k in keys)


def verdict(cases: list[dict[str, Any]], scan_only: bool) -> dict[str, Any]:
    misses = [f"{c['model']}/{c['preset']}: {name} ({check.get('value')} vs limit {check.get('limit')})"
              for c in cases for name, check in (c["goals"] or {}).items() if check["ok"] is False]
    if scan_only:
        misses.append("--scan-only: the search side was skipped, nothing compared")
    return {"benchmark": "search_vs_scan", "verdict": "misses" if misses or not cases else "meets", "misses": misses,
            "goals": {"meets_gates": "resolve_gates(None, fidelity=preset) on the champion's run metrics",
                      "no_larger": f"size_mb <= scan pick x {SIZE_SLACK}",
                      "no_less_faithful": f"kld_mean <= scan pick x {KLD_SLACK} + {KLD_ABS}",
                      "time": f"time_to_champion_s <= scan wall_s x {TIME_GOAL}"}}


# -- driver --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mlflow_edge.gates import FIDELITY_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,noisy", help="demo and/or noisy")
    parser.add_argument("--presets", default=",".join(FIDELITY_PRESETS), help="fidelity presets")
    parser.add_argument("--trials", type=int, default=8, help="search budget in trials")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows (search) = chunks (scan)")
    parser.add_argument("--noise", type=float, default=0.07, help="noise std as a fraction of each matrix's std")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search and of the noise")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--scan-only", action="store_true", help="skip the search side (check the scan alone)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not args.models or not set(args.models) <= {"demo", "noisy"}:
        parser.error("--models: demo and/or noisy")
    if not args.presets or not set(args.presets) <= set(FIDELITY_PRESETS):
        parser.error(f"--presets: among {', '.join(FIDELITY_PRESETS)}")
    if min(args.trials, args.windows) < 1 or args.noise <= 0:
        parser.error("--trials and --windows must be positive, --noise above 0")
    return args


def prepare_model(model: str, args: argparse.Namespace, scratch: Path) -> tuple[Any, str, Path]:
    """The source, the ``--model`` argument the search gets, and its f16 GGUF (normal cache, untimed)."""
    from mlflow_edge import artifacts
    from mlflow_edge.sources import resolve_source

    source = resolve_source("demo")
    model_arg = "demo"
    if model == "noisy":
        progress(f"building the noisy copy (std {args.noise} x each matrix's std, seed {args.seed})")
        source = add_noise(source, scratch / f"{source.name}-noisy", args.noise, args.seed)
        model_arg = str(source.path)
    progress(f"{model}: f16 GGUF (artifacts.convert, cached)")
    return source, model_arg, artifacts.convert(source, "llamacpp").path


def run(args: argparse.Namespace, user_cache: Path, scratch: Path) -> int:
    from mlflow_edge.evaluation.harness import EvalSettings
    from mlflow_edge.gates import FIDELITY_PRESETS
    from mlflow_edge.targets import hardware_fingerprint

    start = time.perf_counter()
    window = EvalSettings().window
    tools = tools_dir()
    emit({"setup": {"models": args.models, "presets": {p: FIDELITY_PRESETS[p] for p in args.presets},
                    "trials": None if args.scan_only else args.trials, "seed": args.seed, "window": window,
                    "windows": args.windows, "scan_types": SCAN_TYPES, "tools": str(tools),
                    "llama_cpp_python": llama_cpp_version(), "scratch": str(scratch),
                    "noise": {"std_fraction": args.noise, "seed": args.seed,
                              "applies_to": "every 2-D weight matrix of the noisy copy (its own reference)"},
                    "tolerances": {"size": SIZE_SLACK, "kld": [KLD_SLACK, KLD_ABS], "time": TIME_GOAL},
                    "scan_reading": "step down until the first type that fails; the pick is the one before it"}})
    cases = []
    for model in args.models:
        source, model_arg, f16 = prepare_model(model, args, scratch)
        scan = Scan(model, tools, f16, scratch / f"scan-{model}", window, args.windows)
        for preset in args.presets:
            cases.append(run_case(args, model, model_arg, preset, scan, scratch, user_cache))
            emit(cases[-1])
    emit({**verdict(cases, args.scan_only), "wall_s": round(time.perf_counter() - start, 1),
          "machine": hardware_fingerprint()})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    user_cache = Path(os.environ.get("MLFLOW_EDGE_CACHE") or Path.home() / ".cache" / "mlflow-edge").resolve()
    scratch = Path(tempfile.mkdtemp(prefix="search-vs-scan-"))
    try:
        return run(args, user_cache, scratch)
    finally:
        if args.keep:
            progress(f"kept the scratch folder {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
