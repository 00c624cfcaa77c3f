"""The MLX backend's class: what it declares (precisions, options, targets, its server), what the search samples and
knows before quantizing (bits per weight, resource needs), and the Protocol's steps on top of its modules."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from mlflow_edge import recipes
from mlflow_edge.backends.base import Artifact, BaseBackend, Bits, OptionSpec, StageNeed
from mlflow_edge.backends.mlx.convert import convert_folder, convertible_reason
from mlflow_edge.backends.mlx.folder import check_folder, folder_precision, is_mlx_folder, model_files
from mlflow_edge.backends.mlx.framework import NAME, require_mlx_lm, runtime_distributions
from mlflow_edge.backends.mlx.precision import (
    CONVERT_PRECISIONS,
    DYNAMIC_TARGETS,
    GROUP_SIZES,
    MIXED,
    RECIPES,
    affine_bits,
    convert_dtype,
    group_sizes,
    parse_precision,
    quant_modes,
)
from mlflow_edge.backends.mlx.quantize import budget_plan, method_settings, quantize_folder
from mlflow_edge.backends.mlx.runtime import MLXRunner
from mlflow_edge.errors import EdgeError


class MLXBackend(BaseBackend):
    """MLX folders through mlx-lm: conversion, affine/microscaling/mixed/dynamic/AWQ quantization, the MLX runtime."""

    name: ClassVar[str] = NAME
    format: ClassVar[str] = "mlx"
    flavor: ClassVar[str] = "mlflow_edge.flavors.mlx"
    requirements: ClassVar[tuple[str, ...]] = runtime_distributions()
    # MLX's Linux CPU backend works but is one thread with reference kernels (SmolLM2-135M: a few tokens/s here),
    # so generic CPU targets are better served by llama.cpp/OpenVINO; the Apple-silicon target is its home
    targets: ClassVar[Mapping[str, str]] = {"apple-silicon": "primary"}
    base_precision: ClassVar[str] = "float32"
    sweep_types: ClassVar[tuple[str, ...]] = ("q3_g64", "q4_g64", "q5_g64", "q6_g64", "q8_g64", "mixed_3_6",
                                              "mixed_4_6")
    native_serve_commands: ClassVar[tuple[str, ...]] = (  # mlx-lm's OpenAI-compatible server
        "mlx_lm.server --model {model} --host 127.0.0.1 --port {port}",
    )

    def convert_precisions(self) -> Sequence[str]:
        return CONVERT_PRECISIONS

    def quantize_precisions(self) -> Sequence[str]:
        uniform = [f"q{b}_g{g}" for b in affine_bits() for g in group_sizes()]
        return (*uniform, *quant_modes(), *RECIPES, *DYNAMIC_TARGETS, *(f"awq_{name}" for name in uniform), MIXED)

    def option_specs(self) -> Sequence[OptionSpec]:
        return (
            OptionSpec("q_group_size", int, None, choices=GROUP_SIZES, label="g{value}",
                       help="mixed_* recipes: group size (mlx-lm --q-group-size; default 64)"),
            OptionSpec("recipe", str, None, help=f"{MIXED}: a recipe JSON file (layer pattern -> q<bits>_g<group>, a "
                       "mode, or the dtype for unquantized; see mlflow_edge.recipes)"),
            OptionSpec("target_bpw", float, None, help=f"{MIXED}: per-layer bits within this many bits per weight "
                       "(mlx-lm's dynamic_quant on calibration text, low/high bits either side of it)"),
            OptionSpec("target_size_mb", float, None, help=f"{MIXED}: like target_bpw, for weights of this many MB"),
            OptionSpec("dtype", str, None, choices=CONVERT_PRECISIONS,
                       help="float type of the unquantized parameters and scales (default: the base's)"),
            OptionSpec("low_bits", int, None, help="dynamic_*: bits of the less sensitive layers (default 4)"),
            OptionSpec("low_group_size", int, None, help="dynamic_*: their group size (default 64)"),
            OptionSpec("high_bits", int, None, help="dynamic_*: bits of the most sensitive layers (default 5)"),
            OptionSpec("high_group_size", int, None, help="dynamic_*: their group size (default 64)"),
            OptionSpec("embed_bits", int, None, help="awq_*: bits of the embeddings (default 4)"),
            OptionSpec("embed_group_size", int, None, help="awq_*: group size of the embeddings (default 32)"),
            OptionSpec("n_grid", int, None, help="awq_*: grid points of the scale and clip search (default 20)"),
            OptionSpec("num_samples", int, None, help="dynamic_*/awq_*: calibration windows (default 8)"),
            OptionSpec("sequence_length", int, None, help="dynamic_*/awq_*: tokens per window (default 128)"),
            OptionSpec("adapter_path", str, None,
                       help="mlx-lm LoRA adapter folder (adapters.safetensors + adapter_config.json)"),
            OptionSpec("fuse_adapter", bool, None, help="fuse the adapter before quantizing (else applied at load)"),
        )

    def versions(self) -> Mapping[str, str]:
        require_mlx_lm()
        return {"mlx": version("mlx"), "mlx_lm": version("mlx-lm")}

    def unsupported_reason(self, source: Any) -> str | None:
        return convertible_reason(source)

    def open_artifact(self, path: Path, source: Any) -> Artifact | None:
        if not is_mlx_folder(path):
            return None
        config = check_folder(path)
        return self.artifact(Path(path), folder_precision(Path(path), config), source, {}, model_files(Path(path)))

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        # mlx-lm's default quantization (mlx_lm.convert -q): 4 bits, groups of 64, affine
        return ({"mlx.recipe": "uniform", "mlx.q_bits": 4, "mlx.q_group_size": 64},)

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        # 32 and 64 divide every layer of SmolLM2 (576 wide) and of the tiny test model (256); 128 does not divide 576
        recipe = trial.suggest_categorical("mlx.recipe", ["uniform", "mixed_3_6", "mixed_4_6", MIXED])
        if recipe == MIXED:  # per-layer bits within a sampled budget (dynamic_quant's sensitivities)
            return MIXED, {"target_bpw": trial.suggest_categorical("mlx.target_bpw",
                                                                   list(recipes.SEARCH_BUDGETS_BPW))}
        group = trial.suggest_categorical("mlx.q_group_size", [32, 64])
        if recipe == "uniform":
            bits = trial.suggest_categorical("mlx.q_bits", [3, 4, 5, 6, 8])
            return f"q{bits}_g{group}", {}
        return recipe, {"q_group_size": group}

    def resource_needs(self, facts: Any) -> Sequence[StageNeed]:
        # mlx_lm.convert loads the weights and casts them to the base dtype (float32 here), then writes them
        runtime, fp32 = 1 << 29, facts.bytes_at("float32")
        return (StageNeed("mlx conversion (float32)", runtime + facts.disk_bytes + fp32, fp32,
                          "leave mlx out (--backends)"),
                StageNeed("mlx quantization", runtime + fp32 + facts.parameters, facts.parameters,
                          "leave mlx out (--backends)"))

    def precision_bits(self, precision: str, options: Mapping[str, Any], source: Any) -> Bits | None:
        # affine quantization: the bits and a scale and a bias (16 bits each) per group; mlx-lm's mixed recipes keep
        # about a quarter of the weights (v_proj, down_proj of some layers, lm_head) at the high bits
        if match := re.fullmatch(r"q(\d+)_g(\d+)", precision):
            bits, group = int(match.group(1)), int(match.group(2))
            return Bits("affine", bits + 32 / group)
        if match := re.fullmatch(r"mixed_(\d)_(\d)", precision):
            low, high = int(match.group(1)), int(match.group(2))
            return Bits("mixed", 0.75 * low + 0.25 * high + 32 / int(options.get("q_group_size") or 64))
        if precision == MIXED and options.get("target_bpw") is not None:  # a budget is its bits
            return Bits("dynamic", float(options["target_bpw"]))
        return None

    # -- convert, quantize ---------------------------------------------------------------------------------------
    def convert(self, source: Any, out_dir: Path, precision: str) -> Artifact:
        dtype = convert_dtype(precision)
        convert_folder(source, Path(out_dir), dtype)
        return self.artifact(Path(out_dir), dtype, source, {"dtype": dtype}, model_files(Path(out_dir)))

    def quantize(self, base: Artifact, out_dir: Path, precision: str, options: Mapping[str, Any] | None = None,
                 calibration: Any = None, source: Any = None) -> Artifact:
        settings = self.typed(options)
        if settings.get("fuse_adapter") and not settings.get("adapter_path"):
            raise EdgeError("fuse_adapter needs adapter_path")
        plan, settings = budget_plan(parse_precision(precision), settings, Path(base.path))
        settings = method_settings(plan, settings)
        self.refuse_quantized(base, f"quantize a {'/'.join(CONVERT_PRECISIONS)} conversion")
        recorded = quantize_folder(base, Path(out_dir), plan, settings, calibration)
        return self.artifact(Path(out_dir), plan.precision, base, {**recorded, "base_precision": base.precision},
                             model_files(Path(out_dir)))

    # -- load ----------------------------------------------------------------------------------------------------
    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> MLXRunner:
        return MLXRunner(artifact.path, threads=threads, context_tokens=context_tokens)
