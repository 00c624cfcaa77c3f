"""Child process of the harness: load one artifact (or the reference), time it, score it, report JSON.

Order matters for honest memory: load → speed runs → read peak RSS → accuracy (which maps the reference's cached
log-probabilities, pages that must not count as the artifact's memory).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlflow_edge.backends.base import Artifact, Runner
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.accuracy import DEFAULT_CONFIDENCE, REFERENCE_FILES, AccuracyAccumulator, ReferenceLogprobs

_REF_LOGPROBS, _REF_ARGMAX = REFERENCE_FILES


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image (``VmHWM``; ``ru_maxrss`` would inherit the parent's across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _loader(spec: dict[str, Any]) -> Callable[[], Runner]:
    """Import the runtime now, so that ``load_s`` times loading the artifact, not importing a framework."""
    if spec["kind"] == "reference":
        import transformers  # noqa: F401  (the import is the point)

        from mlflow_edge.backends.reference import TransformersRunner

        return lambda: TransformersRunner(Path(spec["source_path"]), spec["threads"], spec["context_tokens"],
                                          spec.get("reference_dtype", "float32"))
    from mlflow_edge.backends import get_backend

    artifact = Artifact.from_json(spec["artifact"])
    backend = get_backend(artifact.backend)
    backend.versions()  # imports the framework
    return lambda: backend.load(artifact, spec["threads"], spec["context_tokens"])


def measure_speed(runner: Runner, stream: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    flat = stream.reshape(-1).tolist()
    prompt = flat[: spec["prompt_tokens"]]
    prefill = flat[: spec["prefill_tokens"]]
    runner.generate(prompt, 2)  # warm-up: first-call allocations and caches
    repeats = spec["repeats"]
    prefill_s = [runner.prefill(prefill) for _ in range(repeats)]
    runs = [runner.generate(prompt, spec["decode_tokens"]) for _ in range(repeats)]
    totals = np.array([g.total_s for g in runs])
    decode_rates = [(g.generated_tokens - 1) / max(g.total_s - g.ttft_s, 1e-9) for g in runs]
    return {
        "prefill_tok_s": len(prefill) / statistics.median(prefill_s),
        "decode_tok_s": statistics.median(decode_rates),
        "ttft_ms": 1000.0 * statistics.median(g.ttft_s for g in runs),
        "latency_ms_p50": 1000.0 * float(np.percentile(totals, 50)),
        "latency_ms_p95": 1000.0 * float(np.percentile(totals, 95)),
        "latency_cv": float(totals.std() / totals.mean()) if len(totals) > 1 else 0.0,
    }


def measure_accuracy(runner: Runner, tokens: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    window = spec["window"]
    if spec["kind"] == "reference":
        accumulator = AccuracyAccumulator(window)
        for i, row in enumerate(tokens):
            accumulator.add(i, row, runner.logits(row.tolist()), keep=True)
        out = Path(spec["save_reference"])
        accumulator.save_reference(out / (_REF_LOGPROBS + ".partial.npy"), out / (_REF_ARGMAX + ".partial.npy"))
        (out / (_REF_LOGPROBS + ".partial.npy")).rename(out / _REF_LOGPROBS)
        (out / (_REF_ARGMAX + ".partial.npy")).rename(out / _REF_ARGMAX)
        return accumulator.metrics()
    ref_dir = Path(spec["reference"])
    reference = ReferenceLogprobs(ref_dir / _REF_LOGPROBS, ref_dir / _REF_ARGMAX).open()
    accumulator = AccuracyAccumulator(window, reference, spec.get("confidence", DEFAULT_CONFIDENCE))
    for i, row in enumerate(tokens):
        accumulator.add(i, row, runner.logits(row.tolist()))
    return accumulator.metrics()


def run(spec: dict[str, Any]) -> dict[str, float]:
    """Load, then (unless ``speed`` is false) the timed runs, peak memory, and (unless ``accuracy`` is false)
    accuracy on the first ``windows``."""
    tokens = np.load(spec["tokens"])[: spec.get("windows")]
    load = _loader(spec)
    start = time.perf_counter()
    runner = load()
    metrics = {"load_s": time.perf_counter() - start}
    try:
        if spec.get("speed", True):
            metrics.update(measure_speed(runner, np.load(spec["prompt"]), spec))
        metrics["peak_rss_mb"] = _peak_rss_mb()
        if spec.get("accuracy", True):
            metrics.update(measure_accuracy(runner, tokens, spec))
    finally:
        runner.close()
    return metrics


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        result: dict[str, Any] = {"metrics": run(json.loads(spec_path.read_text()))}
        code = 0
    except EdgeError as exc:
        result, code = {"error": str(exc)}, 1
    except Exception as exc:  # report any framework failure as one line; the parent raises it
        result, code = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}, 1
    result_path.write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
