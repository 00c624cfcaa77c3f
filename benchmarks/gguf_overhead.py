"""Framework overhead of mlflow-edge's GGUF path against the same raw llama-cpp-python calls, in the same run.

For the offline demo source (SmolLM2-135M, ``resolve_source("demo")``) and each quantization type, two paths do the
same work and are timed by wall clock:

- **mlflow-edge**: ``LlamaCppBackend().quantize(base, fresh_dir, type)`` (not the cached ``artifacts.quantize``, so
  quantization really runs) + ``Evaluator.evaluate(artifact)`` (a child process per step, as in a real study);
- **raw**: in this process, ``llama_cpp.llama_model_quantize`` with default params and the ftype, then
  ``llama_cpp.Llama(...)``, the harness's speed protocol (warm-up, prefill × repeats, greedy generate × repeats) on
  the llama.cpp C API, and the harness's accuracy (perplexity, KLD, top-1) over the same token windows against the
  same reference log-probabilities, with the numpy helpers of :mod:`mlflow_edge.evaluation.accuracy`.

Not timed: resolving the source, the f16 conversion (normal cache), and the reference, which the harness measures
once and both paths share. Everything else runs against a fresh, temporary ``MLFLOW_EDGE_CACHE``. Rounds alternate
the order (mlflow-edge first in odd rounds, raw first in even ones) to spread machine noise; medians are reported.

Output: JSON lines on stdout (progress on stderr). Run::

    .venv/bin/python benchmarks/gguf_overhead.py [--types Q4_K_M,Q8_0,Q2_K] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import filecmp
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

GOAL = 1.05
EDGE, RAW = "mlflow-edge", "raw"
PPL_RTOL = 1e-4


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def progress(message: str) -> None:
    print(f"[gguf_overhead {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def cache_at(root: str | None) -> Iterator[None]:
    """``MLFLOW_EDGE_CACHE`` set to ``root`` (``None``: unset) inside the block; ``cache_root()`` reads it per call."""
    before = os.environ.get("MLFLOW_EDGE_CACHE")
    if root is None:
        os.environ.pop("MLFLOW_EDGE_CACHE", None)
    else:
        os.environ["MLFLOW_EDGE_CACHE"] = root
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_EDGE_CACHE", None)
        else:
            os.environ["MLFLOW_EDGE_CACHE"] = before


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the mlflow-edge path's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# -- raw llama-cpp-python -----------------------------------------------------------------------------------------
class RawGguf:
    """One GGUF on ``llama_cpp.Llama``; speed on the C API (logits of the last position only), accuracy via ``eval``."""

    def __init__(self, llama_cpp: Any, path: Path, threads: int, context_tokens: int) -> None:
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context_tokens, n_batch=context_tokens,
                                   n_ubatch=context_tokens, n_threads=threads, n_threads_batch=threads,
                                   logits_all=True, verbose=False)
        self.ctx = self.llm.ctx
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(context_tokens, 0, 1)

    def _decode_last(self, tokens: list[int], start: int) -> None:
        batch, lib = self.batch, self.lib
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        if lib.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def prefill(self, tokens: list[int]) -> float:
        self._clear()
        start = time.perf_counter()
        self._decode_last(tokens, 0)
        return time.perf_counter() - start

    def generate(self, tokens: list[int], new_tokens: int) -> tuple[float, float]:
        """Greedy generation of ``new_tokens``; returns (time to first token, total) in seconds."""
        import numpy as np

        def last_argmax() -> int:
            row = self.lib.llama_get_logits_ith(self.ctx, -1)
            return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.n_vocab,))))

        self._clear()
        start = time.perf_counter()
        self._decode_last(tokens, 0)
        token = last_argmax()
        ttft = time.perf_counter() - start
        for position in range(len(tokens), len(tokens) + new_tokens - 1):
            self._decode_last([token], position)
            token = last_argmax()
        return ttft, time.perf_counter() - start

    def logits(self, tokens: list[int]):
        self.llm.reset()  # n_tokens = 0, so eval() drops the whole sequence from the KV cache first
        self.llm.eval(tokens)
        return self.llm.scores[: len(tokens)]

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.llm.close()


def raw_run(llama_cpp: Any, base_path: Path, out_path: Path, qtype: str, tokens_path: Path, prompt_path: Path | None,
            reference_dir: Path, settings: Any) -> dict[str, Any]:
    """Quantize + evaluate ``qtype`` with llama-cpp-python directly, in this process."""
    import numpy as np

    from mlflow_edge.evaluation.accuracy import AccuracyAccumulator, ReferenceLogprobs

    # llama-cpp-python maps ggml's WARN level onto logging.ERROR, so the per-tensor fallback warnings of k-quants
    # reach stderr even after Llama(verbose=False); the mlflow-edge path captures them in its child's pipe
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
    t0 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    rc = llama_cpp.llama_model_quantize(str(base_path).encode(), str(out_path).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc} for {qtype}")
    t1 = time.perf_counter()
    tokens = np.load(tokens_path)
    model = RawGguf(llama_cpp, out_path, settings.threads, settings.context_tokens)
    t2 = time.perf_counter()
    try:
        flat = (np.load(prompt_path) if prompt_path else tokens).reshape(-1).tolist()  # the harness's speed stream
        prompt, prefill = flat[: settings.prompt_tokens], flat[: settings.prefill_tokens]
        model.generate(prompt, 2)  # warm-up, as the harness does
        prefill_s = [model.prefill(prefill) for _ in range(settings.repeats)]
        runs = [model.generate(prompt, settings.decode_tokens) for _ in range(settings.repeats)]
        t3 = time.perf_counter()
        reference = ReferenceLogprobs(reference_dir / "logprobs.npy", reference_dir / "argmax.npy").open()
        accumulator = AccuracyAccumulator(settings.window, reference)
        for i, row in enumerate(tokens):
            accumulator.add(i, row, model.logits(row.tolist()))
        accuracy = accumulator.metrics()
    finally:
        model.close()
    t4 = time.perf_counter()
    return {
        "wall_s": t4 - t0,
        "quantize_s": t1 - t0,
        "evaluate_s": t4 - t1,
        "load_s": t2 - t1,
        "speed_s": t3 - t2,
        "accuracy_s": t4 - t3,
        "size_mb": out_path.stat().st_size / 1e6,
        "prefill_tok_s": len(prefill) / statistics.median(prefill_s),
        "decode_tok_s": statistics.median((settings.decode_tokens - 1) / max(total - ttft, 1e-9)
                                          for ttft, total in runs),
        **accuracy,
    }


# -- mlflow-edge ----------------------------------------------------------------------------------------------------
def edge_run(backend: Any, evaluator: Any, base: Any, out_dir: Path, qtype: str) -> tuple[dict[str, Any], Path]:
    t0 = time.perf_counter()
    artifact = backend.quantize(base, out_dir, qtype)
    t1 = time.perf_counter()
    metrics = evaluator.evaluate(artifact)
    t2 = time.perf_counter()
    return {"wall_s": t2 - t0, "quantize_s": t1 - t0, "evaluate_s": t2 - t1, **metrics}, artifact.path


# -- attribution --------------------------------------------------------------------------------------------------
CHILD_STARTS = {
    "python_bare": "pass",
    "import_llama_cpp": "import llama_cpp",
    "import_worker": "import mlflow_edge.evaluation.worker",
    # what `python -m mlflow_edge.backends.llamacpp.worker` imports before llama_model_quantize runs
    "quantize_child_imports": "import mlflow_edge.backends.llamacpp.worker, llama_cpp",
    # what `python -m mlflow_edge.evaluation.worker` imports before the model loads
    "worker_child_imports": "import mlflow_edge.evaluation.worker; from mlflow_edge.backends import get_backend; "
                            "get_backend('llamacpp'); import llama_cpp",
}


def child_start_costs(runs: int = 5) -> dict[str, float]:
    """Median wall seconds of a fresh interpreter doing each set of imports the mlflow-edge children do."""
    costs = {}
    for name, snippet in CHILD_STARTS.items():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", snippet], check=True)
            times.append(time.perf_counter() - start)
        costs[name] = statistics.median(times)
    return costs


# -- driver -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="Q4_K_M,Q8_0,Q2_K", help="comma-separated llama.cpp quantization types")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the whole comparison")
    parser.add_argument("--window", type=int, default=256, help="tokens per accuracy window (harness default)")
    parser.add_argument("--windows", type=int, default=8, help="accuracy windows (harness default)")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all cores of this process)")
    args = parser.parse_args(argv)
    args.types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    if not args.types or args.repeats < 1:
        parser.error("need at least one type and one round")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    user_cache = os.environ.get("MLFLOW_EDGE_CACHE")
    scratch = Path(tempfile.mkdtemp(prefix="gguf-overhead-"))
    os.environ["MLFLOW_EDGE_CACHE"] = str(scratch / "cache")  # before importing mlflow_edge: nothing cached is timed
    try:
        return run(args, user_cache, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, user_cache: str | None, scratch: Path) -> int:
    import llama_cpp

    from mlflow_edge import artifacts
    from mlflow_edge.backends.llamacpp import LlamaCppBackend
    from mlflow_edge.evaluation.harness import EvalSettings, Evaluator, default_threads
    from mlflow_edge.sources import resolve_source
    from mlflow_edge.targets import hardware_fingerprint

    start = time.perf_counter()
    with cache_at(user_cache):  # the dequantized demo source and the f16 GGUF come from the normal cache
        progress("resolving the demo source and converting it to f16 GGUF (normal cache)")
        source = resolve_source("demo")
        base = artifacts.convert(source, "llamacpp", "f16")
    settings = EvalSettings(window=args.window, windows=args.windows, threads=args.threads or default_threads())
    evaluator = Evaluator(source, settings, workdir=scratch / "eval")
    progress("measuring the reference once (transformers fp32, shared by both paths)")
    reference = evaluator.evaluate_reference()
    reference_dir = evaluator.reference_dir
    backend = LlamaCppBackend()
    emit({"setup": {
        "source": source.name, "base": base.precision, "base_size_mb": base.size_bytes / 1e6,
        "setup_s": round(time.perf_counter() - start, 2), "types": args.types, "rounds": args.repeats,
        "threads": settings.threads, "window": settings.window, "windows": settings.windows,
        "speed_repeats": settings.repeats, "prefill_tokens": settings.prefill_tokens,
        "prompt_tokens": settings.prompt_tokens, "decode_tokens": settings.decode_tokens,
        "llama_cpp_python": llama_cpp.__version__,
        "reference": {k: reference[k] for k in ("perplexity", "decode_tok_s", "size_mb")},
        "note": "reference measured once by the harness (untimed) and shared by both paths",
    }})

    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    pair_ratios: list[float] = []
    pair_overheads: list[float] = []
    pair_cpu_ratios: list[float] = []
    try:
        for round_no in range(1, args.repeats + 1):
            order = (EDGE, RAW) if round_no % 2 else (RAW, EDGE)
            for qtype in args.types:
                work = scratch / f"r{round_no}-{qtype}"
                outputs: dict[str, Path] = {}
                walls: dict[str, float] = {}
                cpus: dict[str, float] = {}
                for path in order:
                    progress(f"round {round_no}/{args.repeats}: {qtype} via {path}")
                    cpu_start = cpu_seconds()
                    if path == EDGE:
                        record, outputs[path] = edge_run(backend, evaluator, base, work / "edge", qtype)
                    else:
                        (work / "raw").mkdir(parents=True)
                        outputs[path] = work / "raw" / "model.gguf"
                        record = raw_run(llama_cpp, base.path, outputs[path], qtype, evaluator.tokens_path,
                                         getattr(evaluator, "prompt_path", None), reference_dir, settings)
                    record["cpu_s"] = cpu_seconds() - cpu_start
                    walls[path], cpus[path] = record["wall_s"], record["cpu_s"]
                    results.setdefault((qtype, path), []).append(record)
                    emit({"type": qtype, "path": path, "round": round_no, **record})
                same_bytes = filecmp.cmp(outputs[EDGE], outputs[RAW], shallow=False)
                results[(qtype, EDGE)][-1]["same_gguf_bytes"] = same_bytes
                pair_ratios.append(walls[EDGE] / walls[RAW])
                pair_overheads.append(walls[EDGE] - walls[RAW])
                pair_cpu_ratios.append(cpus[EDGE] / cpus[RAW])
                shutil.rmtree(work, ignore_errors=True)
    finally:
        evaluator.close()

    ratios, ppl_ok, bytes_ok = [], True, True
    for qtype in args.types:
        edge, raw = results[(qtype, EDGE)], results[(qtype, RAW)]
        edge_s = statistics.median(r["wall_s"] for r in edge)
        raw_s = statistics.median(r["wall_s"] for r in raw)
        ppl_rel = max(abs(e["perplexity"] - r["perplexity"]) / r["perplexity"] for e, r in zip(edge, raw))
        kld_rel = max(abs(e["kld_mean"] - r["kld_mean"]) / max(r["kld_mean"], 1e-12) for e, r in zip(edge, raw))
        same_bytes = all(e["same_gguf_bytes"] for e in edge)
        ppl_ok &= ppl_rel <= PPL_RTOL
        bytes_ok &= same_bytes
        ratios.append(edge_s / raw_s)
        emit({
            "type": qtype,
            "size_mb": edge[0]["size_mb"],
            "perplexity": edge[0]["perplexity"],
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in edge),
            "kld_mean": edge[0]["kld_mean"],
            "top1_agreement": edge[0]["top1_agreement"],
            "edge_s_median": edge_s,
            "raw_s_median": raw_s,
            "ratio": edge_s / raw_s,
            "overhead_s_median": statistics.median(e["wall_s"] - r["wall_s"] for e, r in zip(edge, raw)),
            "edge_cpu_s_median": statistics.median(r["cpu_s"] for r in edge),
            "raw_cpu_s_median": statistics.median(r["cpu_s"] for r in raw),
            "edge_quantize_s_median": statistics.median(r["quantize_s"] for r in edge),
            "raw_quantize_s_median": statistics.median(r["quantize_s"] for r in raw),
            "edge_evaluate_s_median": statistics.median(r["evaluate_s"] for r in edge),
            "raw_evaluate_s_median": statistics.median(r["evaluate_s"] for r in raw),
            "raw_decode_tok_s": statistics.median(r["decode_tok_s"] for r in raw),
            "raw_perplexity": raw[0]["perplexity"],
            "perplexity_rel_diff": ppl_rel,
            "kld_mean_rel_diff": kld_rel,
            "same_gguf_bytes": same_bytes,
        })
    progress("timing the interpreter starts and imports of the mlflow-edge child processes")
    costs = child_start_costs()
    emit({"attribution": {
        **{f"{k}_s": v for k, v in costs.items()},
        "children_per_type": 2,
        "expected_fixed_overhead_s": costs["quantize_child_imports"] + costs["worker_child_imports"],
        "overhead_s_median": statistics.median(pair_overheads),
        "note": "mlflow-edge runs quantize and evaluate in one fresh child each; the raw path pays neither start",
    }})
    ratio_median = statistics.median(pair_ratios)
    emit({
        "benchmark": "gguf_overhead",
        "ratio_median": ratio_median,
        "ratio_per_type": dict(zip(args.types, ratios)),
        "goal": GOAL,
        "meets_goal": ratio_median <= GOAL,
        "cpu_ratio_median": statistics.median(pair_cpu_ratios),
        "same_perplexity": ppl_ok,
        "same_gguf_bytes": bytes_ok,
        "rounds": args.repeats,
        "note": "ratio_median: median over (type, round) of mlflow-edge wall / raw wall, measured back to back; "
                "cpu_ratio_median: the same for user+system CPU seconds (children included)",
        "machine": hardware_fingerprint(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
