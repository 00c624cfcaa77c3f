"""mlflow-edge's ONNX Runtime path against raw ONNX Runtime GenAI on the same model folder, and its precisions side by
side.

For the offline demo source (SmolLM2-135M, ``resolve_source("demo")``), converted once by the ONNX Runtime GenAI
model builder to an ``fp32`` folder and quantized through the content-addressed cache:

1. **pyfunc vs raw**, the same ``int4_rtn`` folder (block 32, ``accuracy_level`` 4: the builder's and ``olive auto-opt
   --precision int4``'s int4 on a CPU), the same session threads:

   - **pyfunc**: the folder saved with the ``onnx`` flavor and loaded by ``mlflow.pyfunc.load_model``;
     ``predict([prompt], params={"max_tokens": N, "temperature": 0})`` (the one request contract): tokenize, prefill,
     greedy decode of at most ``N`` tokens (stopping at end-of-sequence) with the shared numpy sampler, detokenize;
   - **raw**: an ``onnxruntime_genai.Generator`` with the runtime's own greedy search (``do_sample=False``,
     ``append_tokens`` then ``generate_next_token``) on the very ``onnxruntime_genai.Model`` the pyfunc model loaded
     (same weights in memory, same session and threads: two model copies differ by a few percent on a shared
     machine), on token ids tokenized beforehand.

   Both stop at the model's end-of-sequence tokens. Each is timed by wall clock (and process CPU time) per call; tok/s =
   tokens generated (pyfunc: its text tokenized again) / seconds. Rounds alternate the order; the ratio pyfunc / raw
   (goal >= 0.95) is the median over rounds of the two measured back to back, reported with the medians, the
   CPU-time ratio and whether both produced the same text.
2. **precisions side by side**: ``fp32`` (the base), ``fp16``, ``int8_dynamic`` (``olive auto-opt --precision
   int8``'s, and per channel), ``int8_rtn``, ``int4_rtn`` (symmetric, asymmetric, and with the LM head in int8),
   ``int4_k_quant`` and ``int4_hqq`` (LM head in int8), all block 32 with ``accuracy_level`` 4, each measured by the
   shared harness (``Evaluator``: size, decode tok/s, perplexity, KLD against the transformers reference), with ratios
   to ``fp32``.

Output: JSON lines on stdout (progress on stderr), the last one the verdict. Run::

    python benchmarks/onnx_vs_raw.py [--rounds 5] [--new-tokens 64] [--threads N] [--skip-variants]
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
INT4_DEFAULT = {"block_size": 32, "accuracy_level": 4}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def progress(message: str) -> None:
    print(f"[onnx_vs_raw {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- raw ONNX Runtime GenAI -----------------------------------------------------------------------------------------
class RawGenAI:
    """ONNX Runtime GenAI as its own examples drive it, on a loaded ``onnxruntime_genai.Model``: a generator per call,
    the runtime's greedy search."""

    def __init__(self, model: Any) -> None:
        import onnxruntime_genai as og

        self.og, self.model, self.tokenizer = og, model, og.Tokenizer(model)

    def generate(self, ids: list[int], new_tokens: int) -> list[int]:
        import numpy as np

        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        out: list[int] = []
        eos = set(self.tokenizer.eos_token_ids)
        while not generator.is_done() and len(out) < new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos:
                break
            out.append(token)
        return out


def pyfunc_vs_raw(artifact: Any, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    import mlflow
    import numpy as np

    from mlflow_edge.flavors import onnx as onnx_flavor

    model_dir = scratch / "pyfunc-model"
    onnx_flavor.save_model(artifact.path, model_dir, metadata={"mlflow_edge": {"precision": artifact.precision}},
                           max_context=512)
    pyfunc_model = mlflow.pyfunc.load_model(str(model_dir), model_config={"threads": args.threads})
    # the same loaded model (weights in memory, session, threads): the ratio is the pyfunc path's own cost
    raw = RawGenAI(pyfunc_model.get_raw_model().genai_model)
    ids = [int(i) for i in raw.tokenizer.encode(PROMPT)]
    params = {"max_tokens": args.new_tokens, "temperature": 0.0}
    generated: dict[str, int] = {}

    def run_pyfunc() -> tuple[float, float, str]:
        start, cpu = time.perf_counter(), time.process_time()
        text = pyfunc_model.predict([PROMPT], params=params)[0]
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        generated[PYFUNC] = len(raw.tokenizer.encode(text))
        return seconds, cpu_s, text

    def run_raw() -> tuple[float, float, str]:
        start, cpu = time.perf_counter(), time.process_time()
        tokens = raw.generate(ids, args.new_tokens)
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        generated[RAW] = len(tokens)
        return seconds, cpu_s, raw.tokenizer.decode(np.asarray(tokens, dtype=np.int32))

    runs = {PYFUNC: run_pyfunc, RAW: run_raw}
    for run in runs.values():  # warm-up: first-inference allocations
        run()
    seconds: dict[str, list[float]] = {PYFUNC: [], RAW: []}
    cpu_seconds: dict[str, list[float]] = {PYFUNC: [], RAW: []}
    texts: dict[str, str] = {}
    pair_ratios = []
    for round_no in range(1, args.rounds + 1):
        order = (PYFUNC, RAW) if round_no % 2 else (RAW, PYFUNC)
        for path in order:
            elapsed, cpu_s, texts[path] = runs[path]()
            seconds[path].append(elapsed)
            cpu_seconds[path].append(cpu_s)
            emit({"part": "pyfunc_vs_raw", "path": path, "round": round_no, "seconds": elapsed, "cpu_s": cpu_s,
                  "tokens": generated[path], "tok_s": generated[path] / elapsed})
        pair_ratios.append((generated[PYFUNC] / seconds[PYFUNC][-1]) / (generated[RAW] / seconds[RAW][-1]))
    cpu_ratio = (generated[PYFUNC] / statistics.median(cpu_seconds[PYFUNC])) / (
        generated[RAW] / statistics.median(cpu_seconds[RAW]))
    return summarize(artifact, args, len(ids), seconds, generated, texts, pair_ratios, cpu_ratio)


def summarize(artifact: Any, args: argparse.Namespace, prompt_tokens: int, seconds: dict[str, list[float]],
              generated: dict[str, int], texts: dict[str, str], pair_ratios: list[float],
              cpu_ratio: float) -> dict[str, Any]:
    """The comparison's verdict: ``ratio`` is the median over rounds of pyfunc tok/s / raw tok/s, each pair measured
    back to back (on a shared machine, other processes slow whole stretches of rounds down)."""
    tok_s = {path: generated[path] / statistics.median(values) for path, values in seconds.items()}
    ratio = statistics.median(pair_ratios)
    return {
        "part": "pyfunc_vs_raw_summary",
        "folder": artifact.precision,
        "options": dict(artifact.options),
        "new_tokens": args.new_tokens,
        "prompt_tokens": prompt_tokens,
        "pyfunc_tok_s_median": tok_s[PYFUNC],
        "raw_tok_s_median": tok_s[RAW],
        "ratio": ratio,
        "ratio_of_medians": tok_s[PYFUNC] / tok_s[RAW],
        "cpu_ratio": cpu_ratio,
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
        "same_text": texts[PYFUNC] == texts[RAW],
        "rounds": args.rounds,
        "threads": args.threads,
        "tokens": dict(generated),
        "note": "tok/s = generated tokens / wall seconds of one call; cpu_ratio = the same with this process's CPU "
                "seconds; pyfunc includes tokenizing and detokenizing, raw starts from token ids",
    }


# -- precisions through the harness ----------------------------------------------------------------------------------
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("int8_dynamic", "int8_dynamic", {}),
    ("int8_dynamic_per_channel", "int8_dynamic", {"per_channel": True}),
    ("int8_rtn", "int8_rtn", INT4_DEFAULT),
    ("int4_rtn", "int4_rtn", INT4_DEFAULT),
    ("int4_rtn_asym", "int4_rtn", {**INT4_DEFAULT, "is_symmetric": False}),
    ("int4_k_quant", "int4_k_quant", INT4_DEFAULT),
    ("int4_rtn_head_int8", "int4_rtn", {**INT4_DEFAULT, "last_matmul": "int8"}),
    ("int4_hqq_head_int8", "int4_hqq", {**INT4_DEFAULT, "last_matmul": "int8"}),
)
REPORTED = ("size_mb", "bits_per_weight", "decode_tok_s", "prefill_tok_s", "ttft_ms", "perplexity", "kld_mean",
            "top1_agreement", "peak_rss_mb", "latency_cv", "accuracy_retention")


def build_variants(source: Any, base: Any) -> list[tuple[str, Any, float]]:
    """``(label, artifact, seconds to build it)``: the fp16 conversion and the quantizations (cached)."""
    from mlflow_edge import artifacts

    built = []
    start = time.perf_counter()
    built.append(("fp16", artifacts.convert(source, "onnxruntime", "fp16"), time.perf_counter() - start))
    for label, precision, options in VARIANTS:
        progress(f"quantizing {label} (cached after the first run)")
        start = time.perf_counter()
        built.append((label, artifacts.quantize(source, base, precision, options), time.perf_counter() - start))
    return built


def variants_side_by_side(source: Any, base: Any, args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    from mlflow_edge.evaluation.harness import EvalSettings, Evaluator

    built = build_variants(source, base)
    settings = EvalSettings(threads=args.threads, window=args.window, windows=args.windows)
    evaluator = Evaluator(source, settings, workdir=scratch / "eval")
    measured = []
    try:
        progress("measuring the reference (transformers fp32) once")
        reference = evaluator.evaluate_reference()
        for label, artifact, build_s in [("fp32", base, 0.0), *built]:
            progress(f"measuring {label}")
            measured.append((label, artifact, build_s, evaluator.evaluate(artifact)))
    finally:
        evaluator.close()
    baseline = measured[0][3]
    records = []
    for label, artifact, build_s, metrics in measured:
        record = {"part": "variants", "variant": label, "precision": artifact.precision,
                  "options": dict(artifact.options), "build_s": build_s, **{k: metrics[k] for k in REPORTED},
                  "size_vs_fp32": metrics["size_mb"] / baseline["size_mb"],
                  "decode_speedup_vs_fp32": metrics["decode_tok_s"] / baseline["decode_tok_s"],
                  "perplexity_vs_fp32": metrics["perplexity"] / baseline["perplexity"]}
        emit(record)
        records.append(record)
    emit({"part": "reference", **{k: reference[k] for k in ("size_mb", "decode_tok_s", "perplexity")}})
    return records


def verdict(summary: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    line: dict[str, Any] = {"benchmark": "onnx_vs_raw", "ratio": summary["ratio"], "cpu_ratio": summary["cpu_ratio"],
                            "goal": GOAL, "meets_goal": summary["meets_goal"], "same_text": summary["same_text"]}
    if records:
        by_label = {r["variant"]: r for r in records}
        line.update({
            "int4_smaller_than_int8": by_label["int4_rtn"]["size_mb"] < by_label["int8_rtn"]["size_mb"],
            "int4_kld_higher_than_int8": by_label["int4_rtn"]["kld_mean"] > by_label["int8_rtn"]["kld_mean"],
            "k_quant_kld_vs_rtn": by_label["int4_k_quant"]["kld_mean"] / by_label["int4_rtn"]["kld_mean"],
            "most_accurate_int4": min((r for r in records if r["precision"].startswith("int4")),
                                      key=lambda r: r["kld_mean"])["variant"],
            "fastest_decode": max(records, key=lambda r: r["decode_tok_s"])["variant"],
            "smallest": min(records, key=lambda r: r["size_mb"])["variant"],
        })
    return line


# -- driver -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mlflow_edge.evaluation.harness import default_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the pyfunc / raw comparison")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all cores of this process)")
    parser.add_argument("--window", type=int, default=256, help="tokens per accuracy window (harness default)")
    parser.add_argument("--windows", type=int, default=8, help="accuracy windows (harness default)")
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

    progress("resolving the demo source, converting it to fp32 and int4_rtn (normal cache)")
    source = resolve_source("demo")
    base = artifacts.convert(source, "onnxruntime", "fp32")
    int4 = artifacts.quantize(source, base, "int4_rtn", INT4_DEFAULT)
    emit({"setup": {"source": source.name, "base": base.precision, "base_size_mb": base.size_bytes / 1e6,
                    "versions": dict(get_backend("onnxruntime").versions()), "threads": args.threads,
                    "machine": hardware_fingerprint()}})
    with tempfile.TemporaryDirectory(prefix="onnx-vs-raw-") as tmp:
        scratch = Path(tmp)
        progress(f"pyfunc vs raw ONNX Runtime GenAI: {args.rounds} rounds of {args.new_tokens} tokens")
        summary = pyfunc_vs_raw(int4, args, scratch)
        emit(summary)
        records = [] if args.skip_variants else variants_side_by_side(source, base, args, scratch)
    emit(verdict(summary, records))
    return 0 if summary["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
