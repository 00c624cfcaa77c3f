"""The OpenVINO backend's class: what it declares (precisions, options, targets, its server), what the search samples
and knows before quantizing (bits per weight, resource needs), and the Protocol's steps on top of its modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from mlflow_edge import recipes
from mlflow_edge.backends.base import Artifact, BaseBackend, Bits, OptionSpec, StageNeed, option_bool
from mlflow_edge.backends.openvino.budget import BUDGET_MODE, four_bit_bpw
from mlflow_edge.backends.openvino.convert import export_ir, exportable_reason
from mlflow_edge.backends.openvino.device import PERFORMANCE_HINTS, load_settings, runtime_options
from mlflow_edge.backends.openvino.framework import NAME, compress_modes, require_nncf, require_openvino
from mlflow_edge.backends.openvino.ir import MODEL_XML, dominant_weight_type, model_files, model_xml, read_model
from mlflow_edge.backends.openvino.precision import (
    CONVERT_PRECISIONS,
    FOUR_BIT_MODES,
    MIXED,
    OPTIMUM_DTYPE,
    PTQ_PRECISION,
    RECIPE_TYPES,
    check_method_options,
    convert_precision,
)
from mlflow_edge.backends.openvino.quantize import quantize_ir, read_base
from mlflow_edge.backends.openvino.runtime import OpenVINORunner
from mlflow_edge.errors import EdgeError


class OpenVINOBackend(BaseBackend):
    """OpenVINO IR artifacts: optimum-intel export, NNCF compression, the OpenVINO runtime."""

    name: ClassVar[str] = NAME
    format: ClassVar[str] = "openvino_ir"
    flavor: ClassVar[str] = "mlflow_edge.flavors.openvino"
    requirements: ClassVar[tuple[str, ...]] = ("openvino", "transformers")  # the runtime, and the HF tokenizer
    targets: ClassVar[Mapping[str, str]] = {
        "cpu": "primary", "intel-cpu": "primary", "intel-gpu": "primary", "intel-npu": "primary",
        "arm-cpu": "secondary", "arm-mobile": "secondary",
    }
    base_precision: ClassVar[str] = "f16"
    sweep_types: ClassVar[tuple[str, ...]] = ("INT8_SYM", "INT8_ASYM", "INT4_SYM", "INT4_ASYM", "NF4")
    # OpenVINO Model Server (2026.2+ builds the LLM graph of a local IR folder in memory; the folder needs the
    # openvino_tokenizer/detokenizer models); OpenAI-compatible API under /v3
    native_serve_commands: ClassVar[tuple[str, ...]] = (
        "ovms --model_path {model} --model_name {name} --task text_generation --rest_bind_address 127.0.0.1 "
        "--rest_port {port}",
    )

    def convert_precisions(self) -> Sequence[str]:
        return CONVERT_PRECISIONS

    def quantize_precisions(self) -> Sequence[str]:
        return (*compress_modes(), PTQ_PRECISION, MIXED)

    def option_specs(self) -> Sequence[OptionSpec]:
        return (
            OptionSpec("ratio", float, None, label="r{value}",
                       help="share of layers in the 4-bit mode, the rest in backup_mode (NNCF)"),
            OptionSpec("group_size", int, None, label="g{value}",
                       help="weights sharing one scale; -1 per output channel (NNCF)"),
            OptionSpec("group_size_fallback_mode", str, None, choices=("ERROR", "IGNORE", "ADJUST"),
                       help="what NNCF does with layers the group size does not divide"),
            OptionSpec("all_layers", bool, None, help="embeddings and the last MatMul in the primary mode too (NNCF)"),
            OptionSpec("backup_mode", str, None, choices=("NONE", "INT8_SYM", "INT8_ASYM", "MXFP8_E4M3", "FP8_E4M3"),
                       help="precision of the layers left out by ratio (NNCF)"),
            OptionSpec("sensitivity_metric", str, None, choices=(
                "WEIGHT_QUANTIZATION_ERROR", "HESSIAN_INPUT_ACTIVATION", "MEAN_ACTIVATION_VARIANCE",
                "MAX_ACTIVATION_VARIANCE", "MEAN_ACTIVATION_MAGNITUDE"),
                help="how NNCF ranks layers for ratio; all but WEIGHT_QUANTIZATION_ERROR read calibration text"),
            OptionSpec("awq", bool, None, help="activation-aware weight quantization (calibration text)"),
            OptionSpec("scale_estimation", bool, None, help="scales minimizing the layer output error (calibration)"),
            OptionSpec("gptq", bool, None, help="GPTQ weight correction (calibration text)"),
            OptionSpec("lora_correction", bool, None, help="low-rank correction of the error (calibration)"),
            OptionSpec("subset_size", int, None, help="calibration samples NNCF reads (default: 128 / 300 for PTQ)"),
            OptionSpec("calibration_tokens", int, 128, help="tokens per calibration sample"),
            OptionSpec("preset", str, None, choices=("PERFORMANCE", "MIXED"), help="INT8_PTQ: symmetric or mixed"),
            OptionSpec("fast_bias_correction", bool, None, help="INT8_PTQ: NNCF's fast bias correction"),
            OptionSpec("max_drop", float, None,
                       help="INT8_PTQ with accuracy control: largest drop of 1/perplexity on held-out calibration "
                            "text (relative by default: 0.05 keeps accuracy_retention >= 0.95)"),
            OptionSpec("drop_type", str, None, choices=("RELATIVE", "ABSOLUTE"), help="how max_drop is measured"),
            OptionSpec("recipe", str, None, help=f"{MIXED}: a recipe JSON file (weight constant pattern -> "
                       f"{', '.join(RECIPE_TYPES)}; see mlflow_edge.recipes)"),
            OptionSpec("target_bpw", float, None, help=f"{MIXED}: {BUDGET_MODE} on as many layers as fit this many "
                       "bits per weight, NNCF's sensitivity_metric choosing them, the rest INT8_ASYM (group_size: 128 "
                       "where it divides every layer, else 64 or 32)"),
            OptionSpec("target_size_mb", float, None, help=f"{MIXED}: like target_bpw, for weights of this many MB"),
            OptionSpec("device", str, None, help="runtime: CPU, GPU, NPU or AUTO (also NNCF's target device)"),
            OptionSpec("performance_hint", str, None, choices=PERFORMANCE_HINTS, help="runtime: PERFORMANCE_HINT"),
            OptionSpec("inference_precision", str, None, choices=("f32", "f16", "bf16"),
                       help="runtime: INFERENCE_PRECISION_HINT (default: the device's own)"),
        )

    def versions(self) -> Mapping[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        require_openvino()
        require_nncf()
        try:
            return {"openvino": version("openvino"), "nncf": version("nncf"), "optimum_intel": version("optimum-intel")}
        except PackageNotFoundError as exc:
            raise EdgeError(f"{exc.name} is not installed: pip install 'mlflow-edge[openvino]'") from exc

    def unsupported_reason(self, source: Any) -> str | None:
        return exportable_reason(source)

    def open_artifact(self, path: Path, source: Any) -> Artifact | None:
        xml = model_xml(path)
        if xml.name != MODEL_XML or not xml.is_file():
            return None
        model = read_model(xml)  # a corrupt IR is refused here, in one line
        return self.artifact(xml.parent, dominant_weight_type(model), source, {}, model_files(xml.parent))

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        # optimum-intel's own defaults: int8 weights (load_in_8bit), and int4 asym, group 64, ratio 0.8 with AWQ
        return ({"openvino.mode": "INT8_ASYM"},
                {"openvino.mode": "INT4_ASYM", "openvino.group_size": 64, "openvino.ratio": 0.8, "openvino.awq": True,
                 "openvino.scale_estimation": False})

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        mode = trial.suggest_categorical("openvino.mode", ["INT8_SYM", "INT8_ASYM", *FOUR_BIT_MODES, MIXED])
        options: dict[str, Any] = {}
        if mode == MIXED:  # NNCF's per-layer 4/8-bit modes within a sampled budget
            options["group_size"] = trial.suggest_categorical("openvino.group_size", [32, 64])
            options["target_bpw"] = trial.suggest_categorical("openvino.target_bpw", list(recipes.SEARCH_BUDGETS_BPW))
        elif mode in FOUR_BIT_MODES:
            # 32 and 64 divide every layer of SmolLM2 (576 wide) and of the tiny test model (256)
            options["group_size"] = trial.suggest_categorical("openvino.group_size", [32, 64])
            options["ratio"] = trial.suggest_categorical("openvino.ratio", [0.8, 1.0])
            options["awq"] = trial.suggest_categorical("openvino.awq", [False, True])
            options["scale_estimation"] = trial.suggest_categorical("openvino.scale_estimation", [False, True])
            if options["awq"] or options["scale_estimation"]:
                options["subset_size"] = 32
        return mode, options

    def resource_needs(self, facts: Any) -> Sequence[StageNeed]:
        # optimum-intel's export loads the model in torch fp32 and traces it into an f16 IR; NNCF reads the IR and
        # holds the compressed copy beside it
        runtime, f16 = 1 << 30, facts.bytes_at("float16")
        return (StageNeed("openvino conversion (f16 IR)", runtime + facts.bytes_at("float32") + f16, f16,
                          "leave openvino out (--backends)"),
                StageNeed("openvino quantization (NNCF)", runtime + f16 + facts.parameters, facts.parameters,
                          "leave openvino out (--backends)"))

    def precision_bits(self, precision: str, options: Mapping[str, Any], source: Any) -> Bits | None:
        # NNCF: 8-bit modes per channel; 4-bit modes with an fp16 scale (and a 4-bit zero point when asymmetric) per
        # group on `ratio` of the layers, the rest in INT8_ASYM; AWQ and scale estimation are methods of their own
        mode = precision.upper()
        family = "nf4" if mode == "NF4" else "asym" if mode.endswith("_ASYM") else "sym"
        if mode == MIXED:  # a budget is its bits (a recipe file's are known once it is read)
            return Bits("mixed", float(options["target_bpw"])) if options.get("target_bpw") is not None else None
        if mode in ("INT8_SYM", "INT8_ASYM"):
            return Bits(family, 8.0)
        if mode not in FOUR_BIT_MODES:
            return None
        group = int(options.get("group_size") or 128)
        ratio = float(options.get("ratio") if options.get("ratio") is not None else 1.0)
        four = four_bit_bpw(group) if family == "asym" else 4 + 16 / group
        aware = "".join(f"+{name}" for name in ("awq", "scale_estimation", "gptq")
                        if option_bool(options.get(name, False)))
        return Bits(family + aware, ratio * four + (1 - ratio) * 8.0)

    # -- convert, quantize ---------------------------------------------------------------------------------------
    def convert(self, source: Any, out_dir: Path, precision: str) -> Artifact:
        precision = convert_precision(precision)
        export_ir(source, out_dir, precision)
        return self.artifact(out_dir, precision, source, {"weight_format": OPTIMUM_DTYPE[precision]},
                             model_files(out_dir))

    def quantize(self, base: Artifact, out_dir: Path, precision: str, options: Mapping[str, Any] | None = None,
                 calibration: Any = None, source: Any = None) -> Artifact:
        options = self.typed(options)
        precision = precision.upper()
        if precision not in self.quantize_precisions():
            raise EdgeError(f"unknown NNCF precision '{precision}' "
                            f"(choose from {', '.join(self.quantize_precisions())})")
        self.refuse_quantized(base)
        check_method_options(precision, options)
        runtime = runtime_options(options)
        model, recipe = read_base(base, precision, options)
        if recipe is not None:  # its recorded group size where the options leave it unset
            options = self.typed(recipes.with_settings(options, recipe))
            check_method_options(precision, options)
        recorded = quantize_ir(model, base, out_dir, precision, options, runtime, recipe, calibration, source)
        return self.artifact(out_dir, precision, base, {**recorded, "base_precision": base.precision},
                             model_files(out_dir))

    # -- load ----------------------------------------------------------------------------------------------------
    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> OpenVINORunner:
        return OpenVINORunner(artifact.path, threads=threads, context_tokens=context_tokens,
                              **load_settings(artifact.options))
