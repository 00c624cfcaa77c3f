"""mlflow-edge's MLX path against raw mlx-lm on the same folder, and mlx-lm's quantizations side by side.

For the offline demo source (SmolLM2-135M, ``resolve_source("demo")``), converted once by ``mlx_lm.convert`` to a
``float32`` folder and quantized through the content-addressed cache:

1. **pyfunc vs raw**, the same ``q4_g64`` folder (mlx-lm's default: 4 bits, groups of 64, affine):

   - **pyfunc**: the folder saved with the ``mlx`` flavor and loaded by ``mlflow.pyfunc.load_model``;
     ``predict([prompt], params={"max_tokens": N, "temperature": 0})`` (the one request contract): tokenize, prefill,
     greedy decode of at most ``N`` tokens (stopping at end-of-sequence) with the shared numpy sampler, detokenize;
   - **raw**: ``mlx_lm.load`` + ``mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=N)``, the loop
     ``mlx_lm.generate`` runs (its greedy default sampler, its pipelined ``generate_step``), which also tokenizes,
     stops at end-of-sequence and detokenizes; its last response counts the tokens.

   Each is timed by wall clock per call; tok/s = tokens generated (pyfunc: its text tokenized again) / seconds.
   Rounds alternate the order; medians are reported, with the ratio pyfunc / raw (goal >= 0.95) and whether both
   produced the same text.
2. **quantizations vs float32**: ``q4_g64``, ``q8_g64``, the ``mixed_3_6`` recipe (groups of 64) and
   ``dynamic_4.5bpw`` (``mlx_lm.dynamic_quant`` on calibration text: 3-bit and 5-bit layers, groups of 64; with the
   float32 scales this CPU needs, 4 bits in groups of 64 is already 5.0 bits per weight), each measured by the shared
   harness (``Evaluator``: size, bits/weight, decode tok/s, perplexity, KLD against the transformers reference), with
   ratios to ``float32``. MLX's CPU backend is one thread with reference kernels here, so the evaluation windows are
   smaller than the harness defaults (``--window``/``--windows``).

Output: JSON lines on stdout (progress on stderr), the last one the verdict. Run::

    python benchmarks/mlx_vs_raw.py [--rounds 5] [--new-tokens 32] [--window 128] [--windows 4] [--skip-variants]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL = 0.95
PYFUNC, RAW = "pyfunc", "raw"
PROMPT = "The history of the Roman Empire began when"
DYNAMIC = {"low_bits": 3, "high_bits": 5, "num_samples": 4, "sequence_length": 64}
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("q4_g64", {}),
    ("q8_g64", {}),
    ("mixed_3_6", {"q_group_size": 64}),
    ("dynamic_4.5bpw", DYNAMIC),
)
REPORTED = ("size_mb", "bits_per_weight", "decode_tok_s", "prefill_tok_s", "ttft_ms", "perplexity", "kld_mean",
            "top1_agreement", "peak_rss_mb", "latency_cv", "accuracy_retention")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def progress(message: str) -> None:
    print(f"[mlx_vs_raw {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- pyfunc vs raw mlx-lm -----------------------------------------------------------------------------------------
def _timed_paths(artifact: Any, args: argparse.Namespace, scratch: Path) -> tuple[dict[str, Any], Any]:
    """The two generation calls, each returning ``(seconds, text, tokens)``, and the tokenizer."""
    import mlflow
    import mlx_lm

    from mlflow_edge.flavors import mlx as mlx_flavor

    model_dir = scratch / "pyfunc-model"
    mlx_flavor.save_model(artifact.path, model_dir, metadata={"mlflow_edge": {"precision": artifact.precision}})
    pyfunc_model = mlflow.pyfunc.load_model(str(model_dir))
    model, tokenizer = mlx_lm.load(str(artifact.path))
    params = {"max_tokens": args.new_tokens, "temperature": 0.0}

    def run_pyfunc() -> tuple[float, str, int]:
        start = time.perf_counter()
        text = pyfunc_model.predict([PROMPT], params=params)[0]
        seconds = time.perf_counter() - start
        return seconds, text, len(tokenizer.encode(text, add_special_tokens=False))

    def run_raw() -> tuple[float, str, int]:
        start = time.perf_counter()
        text, count = "", 0
        for response in mlx_lm.stream_generate(model, tokenizer, prompt=PROMPT, max_tokens=args.new_tokens):
            text, count = text + response.text, response.generation_tokens  # what mlx_lm.generate returns
        return time.perf_counter() - start, text, count

    return {PYFUNC: run_pyfunc, RAW: run_raw}, tokenizer


def pyfunc_vs_raw(artifact: Any, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    runs, tokenizer = _timed_paths(artifact, args, scratch)
    for run in runs.values():  # warm-up: first-call allocations and compiled kernels
        run()
    seconds: dict[str, list[float]] = {PYFUNC: [], RAW: []}
    texts: dict[str, str] = {}
    generated: dict[str, int] = {}
    pair_ratios = []
    for round_no in range(1, args.rounds + 1):
        for path in (PYFUNC, RAW) if round_no % 2 else (RAW, PYFUNC):
            elapsed, texts[path], generated[path] = runs[path]()
            seconds[path].append(elapsed)
            emit({"part": "pyfunc_vs_raw", "path": path, "round": round_no, "seconds": elapsed,
                  "tokens": generated[path], "tok_s": generated[path] / elapsed})
        pair_ratios.append((generated[PYFUNC] / seconds[PYFUNC][-1]) / (generated[RAW] / seconds[RAW][-1]))
    tok_s = {path: generated[path] / statistics.median(values) for path, values in seconds.items()}
    ratio = tok_s[PYFUNC] / tok_s[RAW]
    return {
        "benchmark": "mlx_pyfunc_vs_raw", "folder": artifact.precision, "new_tokens": args.new_tokens,
        "prompt_tokens": len(tokenizer.encode(PROMPT)), "pyfunc_tok_s_median": tok_s[PYFUNC],
        "raw_tok_s_median": tok_s[RAW], "ratio": ratio, "pair_ratio_median": statistics.median(pair_ratios),
        "goal": GOAL, "meets_goal": ratio >= GOAL, "same_text": texts[PYFUNC].lstrip() == texts[RAW].lstrip(),
        "rounds": args.rounds, "tokens": dict(generated),
        "note": "tok/s = generated tokens / wall seconds of one call, prefill included (pyfunc: its text tokenized "
                "again; raw: mlx-lm's own count); both tokenize and detokenize; mlx-lm's streaming detokenizer drops "
                "the first token's leading space, so texts compare without it; MLX has no thread setting",
    }


# -- quantizations through the harness --------------------------------------------------------------------------------
def build_variants(source: Any, base: Any) -> list[tuple[str, Any, float]]:
    """``(label, artifact, seconds to build it)`` for each quantization (cached after the first run)."""
    from mlflow_edge import artifacts
    from mlflow_edge.evaluation.data import calibration_text

    built = []
    for precision, options in VARIANTS:
        progress(f"quantizing {precision} (cached after the first run)")
        start = time.perf_counter()
        calibration = calibration_text() if precision.startswith("dynamic") else None
        built.append((precision, artifacts.quantize(source, base, precision, options, calibration=calibration),
                      time.perf_counter() - start))
    return built


def variants_vs_float32(source: Any, base: Any, args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    from mlflow_edge.evaluation.harness import EvalSettings, Evaluator

    built = build_variants(source, base)
    settings = EvalSettings(threads=args.threads, window=args.window, windows=args.windows, repeats=args.repeats,
                            prefill_tokens=args.window, prompt_tokens=16, decode_tokens=16)
    evaluator = Evaluator(source, settings, workdir=scratch / "eval")
    measured = []
    try:
        progress("measuring the reference (transformers fp32) once")
        reference = evaluator.evaluate_reference()
        for label, artifact, build_s in [("float32", base, 0.0), *built]:
            progress(f"measuring {label}")
            measured.append((label, artifact, build_s, evaluator.evaluate(artifact)))
    finally:
        evaluator.close()
    baseline = measured[0][3]
    records = []
    for label, artifact, build_s, metrics in measured:
        record = {"part": "variants", "variant": label, "precision": artifact.precision,
                  "options": dict(artifact.options), "build_s": build_s, **{k: metrics[k] for k in REPORTED},
                  "size_vs_float32": metrics["size_mb"] / baseline["size_mb"],
                  "decode_speedup_vs_float32": metrics["decode_tok_s"] / baseline["decode_tok_s"],
                  "perplexity_vs_float32": metrics["perplexity"] / baseline["perplexity"]}
        emit(record)
        records.append(record)
    emit({"part": "reference", "settings": settings.params(),
          **{k: reference[k] for k in ("size_mb", "decode_tok_s", "perplexity")}})
    return records


def verdict(summary: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    line: dict[str, Any] = {"benchmark": "mlx_vs_raw", "ratio": summary["ratio"], "goal": GOAL,
                            "meets_goal": summary["meets_goal"], "same_text": summary["same_text"]}
    if records:
        by_label = {r["variant"]: r for r in records}
        q4, q8 = by_label["q4_g64"], by_label["q8_g64"]
        line.update({
            "q4_smaller_than_q8": q4["size_mb"] < q8["size_mb"],
            "q4_kld_higher_than_q8": q4["kld_mean"] > q8["kld_mean"],
            "dynamic_bits_per_weight": by_label["dynamic_4.5bpw"]["bits_per_weight"],
            "dynamic_kld_vs_mixed_3_6": by_label["dynamic_4.5bpw"]["kld_mean"] / by_label["mixed_3_6"]["kld_mean"],
            "fastest_decode": max(records, key=lambda r: r["decode_tok_s"])["variant"],
            "smallest": min(records, key=lambda r: r["size_mb"])["variant"],
        })
    return line


# -- driver -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mlflow_edge.evaluation.harness import default_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the pyfunc / raw comparison")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call")
    parser.add_argument("--threads", type=int, default=None, help="threads of the reference (MLX has no setting)")
    parser.add_argument("--window", type=int, default=128, help="tokens per accuracy window (also the prefill)")
    parser.add_argument("--windows", type=int, default=4, help="accuracy windows")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per artifact")
    parser.add_argument("--skip-variants", action="store_true", help="only the pyfunc / raw comparison")
    args = parser.parse_args(argv)
    args.threads = args.threads or default_threads()
    if args.rounds < 1 or args.new_tokens < 2:
        parser.error("need at least one round and two new tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow_edge import artifacts
    from mlflow_edge.backends import get_backend
    from mlflow_edge.sources import resolve_source
    from mlflow_edge.targets import hardware_fingerprint

    progress("resolving the demo source, converting it to float32 and q4_g64 (normal cache)")
    source = resolve_source("demo")
    base = artifacts.convert(source, "mlx", "float32")
    q4 = artifacts.quantize(source, base, "q4_g64")
    emit({"setup": {"source": source.name, "base": base.precision, "base_size_mb": base.size_bytes / 1e6,
                    "versions": dict(get_backend("mlx").versions()), "threads": args.threads,
                    "machine": hardware_fingerprint()}})
    with tempfile.TemporaryDirectory(prefix="mlx-vs-raw-") as tmp:
        scratch = Path(tmp)
        progress(f"pyfunc vs raw mlx-lm: {args.rounds} rounds of {args.new_tokens} tokens")
        summary = pyfunc_vs_raw(q4, args, scratch)
        emit(summary)
        records = [] if args.skip_variants else variants_vs_float32(source, base, args, scratch)
    emit(verdict(summary, records))
    return 0 if summary["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
