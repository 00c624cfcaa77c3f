"""The llama.cpp backend's class: what it declares (types, options, targets, servers), what the search samples and
knows before quantizing (bits per weight, resource needs, a predicted KLD), and the three steps of the Protocol."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from mlflow_edge import recipes
from mlflow_edge.backends.base import Artifact, BaseBackend, Bits, OptionSpec, StageNeed, option_bool
from mlflow_edge.backends.llamacpp.convert import convert_hf_to_gguf, supported_architectures
from mlflow_edge.backends.llamacpp.ggml import (
    CONVERT_PRECISIONS,
    GGUF_NAME,
    MIXED,
    file_type_name,
    quant_types,
    require_llama_cpp,
)
from mlflow_edge.backends.llamacpp.imatrix import Imatrix, cached_imatrix
from mlflow_edge.backends.llamacpp.quantize import (
    DEFAULT_RECIPE_TYPES,
    candidate_types,
    check_quantize,
    recipe_mode,
    run_quantize,
)
from mlflow_edge.backends.llamacpp.recipe import allocated_recipe, checked_recipe
from mlflow_edge.backends.llamacpp.runtime import LlamaCppRunner
from mlflow_edge.backends.llamacpp.sensitivity import (
    TABLE_TYPE,
    measured_sensitivity,
    sensitivity_table,
    uniform_error,
)

RECIPE_FILE = "recipe.json"
SEARCH_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S",
                "Q5_K_M", "Q6_K", "Q8_0")
"""The uniform types (llama.cpp's own mixtures) the search samples."""
"""Bits per weight (of the quantized tensors) the search samples for a :data:`MIXED` recipe: from Q4_0's size to
between Q6_K and Q8_0, where the gates of a real evaluation usually fall."""
MIXED_START_BPW = 6.0
"""The budget of the mixed recipe a new study tries first: between Q5_K_M and Q6_K on models whose rows are multiples
of 256, and just under Q4_K_M on SmolLM2 (6.16 bits per quantized weight there: its 576-wide rows make the k-quants
fall back to Q5_0 / Q5_1)."""
TYPE_BPW: dict[str, tuple[float, str | None]] = {
    "Q2_K": (2.96, "Q2_K"), "Q3_K_S": (3.50, "Q3_K"), "Q3_K_M": (3.91, "Q3_K"), "Q3_K_L": (4.27, "Q3_K"),
    "Q4_0": (4.50, None), "Q4_1": (5.00, None), "Q4_K_S": (4.58, "Q4_K"), "Q4_K_M": (4.84, "Q4_K"),
    "Q5_0": (5.50, None), "Q5_1": (6.00, None), "Q5_K_S": (5.52, "Q5_K"), "Q5_K_M": (5.68, "Q5_K"),
    "Q6_K": (6.56, "Q6_K"), "Q8_0": (8.50, None),
}
"""Bits per weight of the uniform types: the block types' own, the mixtures' averages on a 7B Llama (llama.cpp's
quantize tables), and the k-quant each mixture is made of (``None``: a legacy type that never falls back)."""
K_FALLBACK_BPW = {"Q2_K": 4.5, "Q3_K": 4.5, "Q4_K": 5.5, "Q5_K": 6.0, "Q6_K": 8.5}
"""Bits per weight llama.cpp falls back to for a k-quant on rows that are no multiple of its 256-wide blocks
(IQ4_NL, Q5_0, Q5_1, Q8_0)."""
K_BLOCK = 256


class LlamaCppBackend(BaseBackend):
    """GGUF artifacts through llama.cpp."""

    name: ClassVar[str] = "llamacpp"
    format: ClassVar[str] = "gguf"
    flavor: ClassVar[str] = "mlflow_edge.flavors.gguf"
    requirements: ClassVar[tuple[str, ...]] = ("llama-cpp-python",)
    targets: ClassVar[Mapping[str, str]] = {
        "cpu": "primary", "arm-cpu": "primary", "arm-mobile": "primary",
        "nvidia-gpu": "secondary", "apple-silicon": "secondary",  # llama.cpp built with CUDA / Metal
    }
    base_precision: ClassVar[str] = "f16"
    sweep_types: ClassVar[tuple[str, ...]] = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
    # llama.cpp's own server binary, and llama-cpp-python's (its [server] extra): both OpenAI-compatible
    native_serve_commands: ClassVar[tuple[str, ...]] = (
        "llama-server -m {model} --host 127.0.0.1 --port {port}",
        "python -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port}",
    )

    def convert_precisions(self) -> Sequence[str]:
        return CONVERT_PRECISIONS

    def quantize_precisions(self) -> Sequence[str]:
        return (*quant_types(), MIXED)

    def option_specs(self) -> Sequence[OptionSpec]:
        return (
            OptionSpec("imatrix", bool, False, help="compute an importance matrix from calibration text"),
            OptionSpec("imatrix_chunks", int, 16, label="",
                       help="calibration chunks of 512 tokens for the importance matrix"),
            OptionSpec("allow_requantize", bool, False, help="allow re-quantizing tensors that are already quantized"),
            OptionSpec("pure", bool, False, help="quantize every tensor to the default type (no k-quant mixtures)"),
            OptionSpec("leave_output_tensor", bool, False, help="keep output.weight unquantized"),
            OptionSpec("output_tensor_type", str, None, help="ggml type for output.weight (e.g. Q8_0)"),
            OptionSpec("token_embedding_type", str, None, help="ggml type for token_embd.weight (e.g. Q8_0)"),
            OptionSpec("nthread", int, 0, help="quantization threads (0: all cores)"),
            OptionSpec("recipe", str, None, help="a recipe JSON file (tensor pattern -> type, see "
                       "mlflow_edge.recipes) to apply; with precision MIXED its default_type is the file type"),
            OptionSpec("target_bpw", float, None, help="per-tensor types chosen from recipe_types by measured "
                       "sensitivity, within this many bits per weight of the quantized tensors"),
            OptionSpec("target_size_mb", float, None, help="like target_bpw, within a model file of this many MB"),
            OptionSpec("recipe_types", str, DEFAULT_RECIPE_TYPES, help="comma-separated candidate ggml types of "
                       "target_bpw / target_size_mb"),
        )

    def versions(self) -> Mapping[str, str]:
        return {"llama_cpp_python": require_llama_cpp().__version__}

    def unsupported_reason(self, source: Any) -> str | None:
        known = supported_architectures()
        if source.architecture in known:
            return None
        return (f"llama.cpp's convert_hf_to_gguf.py ({len(known)} architectures) cannot convert "
                f"{source.architecture}")

    def open_artifact(self, path: Path, source: Any) -> Artifact | None:
        if not (path.is_file() and path.suffix.lower() == ".gguf"):
            return None
        from mlflow_edge.sources import validate_gguf

        validate_gguf(path)
        return self.artifact(path, file_type_name(path), source, {}, (path,))

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        return ({"llamacpp.precision": "Q4_K_M", "llamacpp.imatrix": False},  # llama.cpp's recommended default
                {"llamacpp.precision": MIXED, "llamacpp.target_bpw": MIXED_START_BPW, "llamacpp.imatrix": False})

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        precision = trial.suggest_categorical("llamacpp.precision", [*SEARCH_TYPES, MIXED])
        options: dict[str, Any] = {}
        if precision == MIXED:  # a per-tensor recipe allocated within a sampled budget
            options["target_bpw"] = trial.suggest_categorical("llamacpp.target_bpw", list(recipes.SEARCH_BUDGETS_BPW))
        options["imatrix"] = trial.suggest_categorical("llamacpp.imatrix", [False, True])
        if options["imatrix"]:
            options["imatrix_chunks"] = 8
        return precision, options

    def precision_bits(self, precision: str, options: Mapping[str, Any], source: Any) -> Bits | None:
        imatrix = "+imatrix" if option_bool(options.get("imatrix", False)) else ""
        if precision == MIXED:
            target = options.get("target_bpw")
            return Bits("mixed" + imatrix, float(target)) if target is not None else None
        if precision not in TYPE_BPW:
            return None
        bpw, k_type = TYPE_BPW[precision]
        if k_type is not None:  # rows no multiple of 256 (SmolLM2's 576) fall back to a legacy type
            from mlflow_edge.sources import matrix_widths

            widths = matrix_widths(source)
            narrow = sum(n for width, n in widths.items() if width % K_BLOCK) / max(sum(widths.values()), 1)
            bpw = (1 - narrow) * bpw + narrow * max(K_FALLBACK_BPW[k_type], bpw)
        return Bits("type" + imatrix, round(bpw, 3))

    def resource_needs(self, facts: Any) -> Sequence[StageNeed]:
        # convert_hf_to_gguf.py reads the checkpoint lazily (a few tensors at a time, in fp32) and writes f16;
        # llama_model_quantize maps the f16 file and writes the quantized one. (A budgeted recipe's sensitivity pass,
        # which holds the source in fp32 for its Fisher factors, is not planned: it runs only for MIXED trials.)
        runtime, tensor = 1 << 29, 4 * facts.largest_tensor
        f16 = facts.bytes_at("float16")
        return (StageNeed("llamacpp conversion (f16)", runtime + 3 * tensor, f16,
                          "leave llamacpp out (--backends)"),
                StageNeed("llamacpp quantization", runtime + f16 + 2 * tensor, facts.parameters * 6 // 8,
                          "leave llamacpp out (--backends)"))

    def estimated_kld(self, base: Artifact, precision: str, options: Mapping[str, Any], calibration: Any,
                      source: Any) -> float | None:
        """The mean KLD the per-tensor sensitivity predicts for a configuration — half its summed Fisher-weighted
        error (:func:`~mlflow_edge.backends.llamacpp.sensitivity.tensor_errors`), a uniform type estimated by its
        main k-quant on every tensor — when the table is already measured for ``base`` (a budgeted recipe measured
        it); ``None`` otherwise."""
        options = self.typed(options)
        table = measured_sensitivity(base, options, calibration, source)
        if table is None:
            return None
        if precision == MIXED and options.get("target_bpw") is not None:
            budget = recipes.budget_bits(table, target_bpw=options["target_bpw"])
            return recipes.predict(table, recipes.allocate(table, budget))["error"] / 2
        error = uniform_error(table, TABLE_TYPE[precision]) if precision in TABLE_TYPE else None
        return None if error is None else error / 2

    # -- convert -------------------------------------------------------------------------------------------------
    def convert(self, source: Any, out_dir: Path, precision: str) -> Artifact:
        precision = precision.lower()
        final = convert_hf_to_gguf(source, out_dir, precision)
        return self.artifact(final, precision.upper() if precision != "q8_0" else "Q8_0", source,
                             {"outtype": precision}, (final,))

    # -- quantize ------------------------------------------------------------------------------------------------
    def quantize(self, base: Artifact, out_dir: Path, precision: str, options: Mapping[str, Any] | None = None,
                 calibration: Any = None, source: Any = None) -> Artifact:
        options = self.typed(options)
        qtype = precision.upper()
        mode = recipe_mode(options, qtype)
        check_quantize(base, qtype, options)
        recipe = checked_recipe(self.name, base, qtype, options) if mode == "recipe" else None
        if recipe is not None:  # its recorded settings (the importance matrix) where the options leave them unset
            options = self.typed(recipes.with_settings(options, recipe))
        candidates = candidate_types(options) if mode == "target" else ()
        recorded = {k: v for k, v in options.items() if v not in (None, "", False, 0) or k == "imatrix"}
        imatrix = cached_imatrix(base, options, calibration, source, recorded)
        table = None
        if mode == "target":  # measured and allocated before anything is written
            table = sensitivity_table(base, candidates, options, imatrix, calibration, source)
            recipe = allocated_recipe(self.name, base, qtype, options, table, candidates, imatrix, calibration,
                                      source)
            recorded.update(recipe_types=",".join(candidates), predicted_bpw=recipe.predicted["bpw"])
            if recipe.sensitivity["error"] == "fisher":  # data-aware: the calibration text is provenance
                recorded.update({"calib.dataset": calibration.label, "calib.sha256": calibration.sha256})
        out_dir.mkdir(parents=True, exist_ok=True)
        if imatrix is not None:
            imatrix = Imatrix(Path(shutil.copyfile(imatrix.path, out_dir / "imatrix.gguf")), imatrix.key)
        default_type = recipe.default_type if qtype == MIXED else qtype
        final = run_quantize(base, out_dir / GGUF_NAME, default_type, options, imatrix, recipe.rules if recipe else ())
        if recipe is not None:  # beside the model, not one of its files (its size and content hash are the GGUF's)
            recipe.save(out_dir / RECIPE_FILE)
            recorded["recipe_sha256"] = recipe.digest()
        if table is not None:
            table.to_csv(out_dir / "sensitivity.csv", index=False)
            recipes.plot_sensitivity(table, out_dir / "sensitivity.png",
                                     title=f"{base.source_name}: predicted error per tensor and type")
        return self.artifact(final, qtype, base, {**recorded, "base_precision": base.precision}, (final,))

    # -- load ----------------------------------------------------------------------------------------------------
    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> LlamaCppRunner:
        return LlamaCppRunner(artifact.path, threads=threads, context_tokens=context_tokens)
