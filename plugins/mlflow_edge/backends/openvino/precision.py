"""The precision names of this backend and the options each method takes: conversion types, NNCF's weight
compression modes, ``INT8_PTQ`` and the recipe's ``MIXED``; which options read calibration text, and the refusal of
options that belong to another method."""

from __future__ import annotations

from typing import Any, Mapping

from mlflow_edge.backends.base import option_bool
from mlflow_edge.backends.openvino.device import RUNTIME_OPTIONS
from mlflow_edge.errors import EdgeError
from mlflow_edge.recipes import BUDGET_OPTIONS

CONVERT_PRECISIONS = ("f32", "f16", "bf16")
_CONVERT_ALIASES = {"fp32": "f32", "fp16": "f16"}
OPTIMUM_DTYPE = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}
PTQ_PRECISION = "INT8_PTQ"
FOUR_BIT_MODES = ("INT4_SYM", "INT4_ASYM", "NF4")

WEIGHT_OPTIONS = ("ratio", "group_size", "all_layers", "backup_mode", "sensitivity_metric", "awq", "scale_estimation",
                  "gptq", "lora_correction")
DATA_AWARE = ("awq", "scale_estimation", "gptq", "lora_correction")
PTQ_OPTIONS = ("preset", "fast_bias_correction", "max_drop", "drop_type")
GROUP_OPTIONS = ("group_size", "group_size_fallback_mode")

MIXED = "MIXED"
"""The precision of per-layer types: those a recipe file decides (option ``recipe``), or those NNCF's sensitivity
picks within a bit budget (``target_bpw`` / ``target_size_mb``)."""
BUDGET_ALLOWED = (*BUDGET_OPTIONS, "sensitivity_metric", "subset_size", "calibration_tokens", *GROUP_OPTIONS)
RECIPE_FILE = "recipe.json"
UNCOMPRESSED = "NONE"
"""The recipe type of a layer left uncompressed, at the IR's float type (NNCF's ``BackupMode.NONE``)."""
RECIPE_MODES = ("INT8_SYM", "INT8_ASYM", "INT4_SYM", "INT4_ASYM", "NF4")
"""The NNCF modes a recipe may give a layer: those the compressed IR tells apart by its weight constant alone."""
RECIPE_TYPES = (*RECIPE_MODES, UNCOMPRESSED)


def convert_precision(precision: str) -> str:
    """A conversion type as this backend names it (optimum's ``fp32``/``fp16`` accepted), or a one-line error."""
    precision = _CONVERT_ALIASES.get(precision.lower(), precision.lower())
    if precision not in CONVERT_PRECISIONS:
        raise EdgeError(f"unknown OpenVINO conversion type '{precision}' "
                        f"(choose from {', '.join(CONVERT_PRECISIONS)})")
    return precision


def needs_data(options: Mapping[str, Any]) -> bool:
    metric = str(options.get("sensitivity_metric", "WEIGHT_QUANTIZATION_ERROR")).upper()
    return any(option_bool(options.get(name, False)) for name in DATA_AWARE) or metric != "WEIGHT_QUANTIZATION_ERROR"


def check_method_options(precision: str, options: Mapping[str, Any]) -> None:
    """Refuse options of another method: weight compression's with ``INT8_PTQ``, PTQ's with weight compression,
    ``recipe`` or a budget without :data:`MIXED`, with a recipe anything but the group size and runtime options,
    with a budget anything but those and the sensitivity metric's."""
    for name in ("recipe", *BUDGET_OPTIONS):
        if name in options and precision != MIXED:
            raise EdgeError(f"{name} applies with precision {MIXED}, not {precision}")
    if precision == MIXED and any(name in options for name in BUDGET_OPTIONS):
        if given := [name for name in ("recipe", *BUDGET_OPTIONS) if name in options][1:]:
            raise EdgeError(f"give one of recipe, target_bpw and target_size_mb, not {' and '.join(given)} too")
        if misplaced := sorted(set(options) - {*BUDGET_ALLOWED, *RUNTIME_OPTIONS}):
            raise EdgeError(f"{', '.join(misplaced)} do(es) not apply to a {MIXED} budget: NNCF's sensitivity "
                            f"decides each layer's mode ({', '.join(BUDGET_ALLOWED[2:])} apply)")
    elif precision == MIXED:
        if not options.get("recipe"):
            raise EdgeError(f"precision {MIXED} needs recipe=<a recipe JSON file>, target_bpw=<bits> or "
                            "target_size_mb=<MB>")
        if misplaced := sorted(set(options) - {"recipe", *GROUP_OPTIONS, *RUNTIME_OPTIONS}):
            raise EdgeError(f"{', '.join(misplaced)} do(es) not apply to {MIXED}: the recipe decides every layer's "
                            "type, data-free")
    elif precision == PTQ_PRECISION:
        if misplaced := sorted(set(options) & set(WEIGHT_OPTIONS)):
            raise EdgeError(f"{', '.join(misplaced)} apply to weight compression, not {PTQ_PRECISION}")
    elif misplaced := sorted(set(options) & set(PTQ_OPTIONS)):
        raise EdgeError(f"{', '.join(misplaced)} apply to {PTQ_PRECISION} only, not {precision}")
