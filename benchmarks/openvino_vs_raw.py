"""mlflow-edge's OpenVINO path against raw OpenVINO on the same IR, and NNCF variants against fp16.

For the offline demo source (SmolLM2-135M, ``resolve_source("demo")``), converted once to an ``f16`` IR (normal
cache):

1. **pyfunc vs raw**, same IR, same runtime settings (CPU, ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_NUM_THREADS``):

   - **pyfunc**: the IR saved with the ``openvino`` flavor and loaded by ``mlflow.pyfunc.load_model``;
     ``predict([prompt], params={"max_tokens": N, "temperature": 0})`` (the one request contract): tokenize,
     prefill, greedy decode of at most ``N`` tokens (stopping at end-of-sequence), detokenize;
   - **raw**: ``openvino.Core().compile_model`` and one infer request in a plain greedy loop (``reset_state``, prefill,
     then one token per ``infer`` with the grown attention mask), on token ids tokenized beforehand (untimed).

   Both stop at the model's end-of-sequence tokens. Each is timed by wall clock per call; tok/s = tokens generated
   (pyfunc: its text tokenized again) / seconds. Rounds alternate the order (pyfunc first in odd
   rounds); medians are reported, with the ratio pyfunc / raw (goal >= 0.95) and whether both produced the same text.
2. **variants vs fp16**: ``INT8_ASYM``, ``INT4_ASYM`` (group size 64) and ``INT4_ASYM`` with AWQ + scale estimation
   (calibration text), quantized by NNCF through the content-addressed cache, each measured by the shared harness
   (``Evaluator``: size, decode tok/s, perplexity, KLD against the transformers reference), with ratios to ``f16``.

Output: JSON lines on stdout (progress on stderr). Run::

    python benchmarks/openvino_vs_raw.py [--rounds 5] [--new-tokens 64] [--threads N] [--skip-variants]
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


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def progress(message: str) -> None:
    print(f"[openvino_vs_raw {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- raw OpenVINO ---------------------------------------------------------------------------------------------------
class RawOpenVINO:
    """The IR on one OpenVINO infer request: the plain greedy loop a user would write."""

    def __init__(self, xml: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                             "INFERENCE_NUM_THREADS": threads})
        self.request = self.compiled.create_infer_request()

    def generate(self, ids: list[int], new_tokens: int, eos: frozenset[int] = frozenset()) -> list[int]:
        import numpy as np

        request = self.request
        request.reset_state()
        length = len(ids)
        beam = np.zeros(1, dtype=np.int32)
        logits = request.infer({
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, length), dtype=np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None, :],
            "beam_idx": beam,
        })["logits"]
        token = int(logits[0, -1].argmax())
        out = [] if token in eos else [token]
        while out and len(out) < new_tokens:
            length += 1
            logits = request.infer({
                "input_ids": np.array([[token]], dtype=np.int64),
                "attention_mask": np.ones((1, length), dtype=np.int64),
                "position_ids": np.array([[length - 1]], dtype=np.int64),
                "beam_idx": beam,
            })["logits"]
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
        return out


def pyfunc_vs_raw(artifact: Any, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    import mlflow
    from transformers import AutoTokenizer

    from mlflow_edge.flavors import openvino as ov_flavor

    model_dir = scratch / "pyfunc-model"
    ov_flavor.save_model(artifact.path, model_dir, metadata={"mlflow_edge": {"precision": artifact.precision}})
    pyfunc_model = mlflow.pyfunc.load_model(str(model_dir), model_config={"threads": args.threads})
    raw = RawOpenVINO(artifact.path / "openvino_model.xml", args.threads)
    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    ids = tokenizer(PROMPT)["input_ids"]
    params = {"max_tokens": args.new_tokens, "temperature": 0.0}
    eos = frozenset([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    generated: dict[str, int] = {}

    def run_pyfunc() -> tuple[float, str]:
        start = time.perf_counter()
        text = pyfunc_model.predict([PROMPT], params=params)[0]
        seconds = time.perf_counter() - start
        generated[PYFUNC] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return seconds, text

    def run_raw() -> tuple[float, str]:
        start = time.perf_counter()
        tokens = raw.generate(ids, args.new_tokens, eos)
        seconds = time.perf_counter() - start
        generated[RAW] = len(tokens)
        return seconds, tokenizer.decode(tokens, skip_special_tokens=True)

    runs = {PYFUNC: run_pyfunc, RAW: run_raw}
    for run in runs.values():  # warm-up: first-inference allocations
        run()
    seconds: dict[str, list[float]] = {PYFUNC: [], RAW: []}
    texts: dict[str, str] = {}
    pair_ratios = []
    for round_no in range(1, args.rounds + 1):
        order = (PYFUNC, RAW) if round_no % 2 else (RAW, PYFUNC)
        for path in order:
            elapsed, texts[path] = runs[path]()
            seconds[path].append(elapsed)
            emit({"part": "pyfunc_vs_raw", "path": path, "round": round_no, "seconds": elapsed,
                  "tokens": generated[path], "tok_s": generated[path] / elapsed})
        pair_ratios.append((generated[PYFUNC] / seconds[PYFUNC][-1]) / (generated[RAW] / seconds[RAW][-1]))
    tok_s = {path: generated[path] / statistics.median(values) for path, values in seconds.items()}
    ratio = tok_s[PYFUNC] / tok_s[RAW]
    return {
        "benchmark": "openvino_pyfunc_vs_raw",
        "ir": artifact.precision,
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(ids),
        "pyfunc_tok_s_median": tok_s[PYFUNC],
        "raw_tok_s_median": tok_s[RAW],
        "ratio": ratio,
        "pair_ratio_median": statistics.median(pair_ratios),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
        "same_text": texts[PYFUNC] == texts[RAW],
        "rounds": args.rounds,
        "threads": args.threads,
        "tokens": dict(generated),
        "note": "tok/s = generated tokens / wall seconds of one call; pyfunc includes tokenizing and detokenizing, "
                "raw starts from token ids",
    }


# -- NNCF variants through the harness --------------------------------------------------------------------------------
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("INT8_ASYM", "INT8_ASYM", {}),
    ("INT4_ASYM_g64", "INT4_ASYM", {"group_size": 64}),
    ("INT4_ASYM_g64_awq_se", "INT4_ASYM", {"group_size": 64, "awq": True, "scale_estimation": True, "subset_size": 32}),
)


def variants_vs_fp16(source: Any, base: Any, args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    from mlflow_edge import artifacts
    from mlflow_edge.evaluation.data import calibration_text
    from mlflow_edge.evaluation.harness import EvalSettings, Evaluator

    settings = EvalSettings(threads=args.threads, window=args.window, windows=args.windows)
    evaluator = Evaluator(source, settings, workdir=scratch / "eval")
    records = []
    try:
        progress("measuring the reference (transformers fp32) once")
        reference = evaluator.evaluate_reference()
        progress(f"measuring {base.precision}")
        baseline = evaluator.evaluate(base)
        measured = [("f16", base, baseline)]
        for label, precision, options in VARIANTS:
            progress(f"quantizing and measuring {label}")
            artifact = artifacts.quantize(source, base, precision, options,
                                         calibration=calibration_text() if options.get("awq") else None)
            measured.append((label, artifact, evaluator.evaluate(artifact)))
    finally:
        evaluator.close()
    for label, artifact, metrics in measured:
        record = {
            "part": "variants", "variant": label, "precision": artifact.precision, "options": dict(artifact.options),
            **{k: metrics[k] for k in ("size_mb", "bits_per_weight", "decode_tok_s", "prefill_tok_s", "ttft_ms",
                                       "perplexity", "kld_mean", "top1_agreement", "peak_rss_mb", "latency_cv")},
            "size_vs_f16": metrics["size_mb"] / baseline["size_mb"],
            "decode_speedup_vs_f16": metrics["decode_tok_s"] / baseline["decode_tok_s"],
            "perplexity_vs_f16": metrics["perplexity"] / baseline["perplexity"],
            "accuracy_retention": metrics["accuracy_retention"],
        }
        emit(record)
        records.append(record)
    emit({"part": "reference", **{k: reference[k] for k in ("size_mb", "decode_tok_s", "perplexity")}})
    return records


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
    import openvino

    from mlflow_edge import artifacts
    from mlflow_edge.backends import get_backend
    from mlflow_edge.sources import resolve_source
    from mlflow_edge.targets import hardware_fingerprint

    progress("resolving the demo source and converting it to an f16 IR (normal cache)")
    source = resolve_source("demo")
    base = artifacts.convert(source, "openvino", "f16")
    emit({"setup": {"source": source.name, "base": base.precision, "base_size_mb": base.size_bytes / 1e6,
                    "versions": dict(get_backend("openvino").versions()), "openvino_build": openvino.get_version(),
                    "threads": args.threads, "machine": hardware_fingerprint()}})
    with tempfile.TemporaryDirectory(prefix="openvino-vs-raw-") as tmp:
        scratch = Path(tmp)
        progress(f"pyfunc vs raw OpenVINO: {args.rounds} rounds of {args.new_tokens} tokens")
        summary = pyfunc_vs_raw(base, args, scratch)
        emit(summary)
        if not args.skip_variants:
            variants_vs_fp16(source, base, args, scratch)
    return 0 if summary["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
