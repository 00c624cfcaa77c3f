"""Per-tensor mixed precision: a recipe file checked against the base GGUF, or a recipe allocated within a budget
from the sensitivity table (:mod:`mlflow_edge.recipes` holds the format and the allocation)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mlflow_edge import recipes
from mlflow_edge.backends.base import Artifact, option_bool
from mlflow_edge.backends.llamacpp.ggml import (
    IMATRIX_REQUIRED,
    MIXED,
    TENSOR_TYPES,
    TENSOR_TYPES_NEED_IMATRIX,
    UNQUANTIZED,
    quant_types,
)
from mlflow_edge.backends.llamacpp.imatrix import Imatrix
from mlflow_edge.backends.llamacpp.layout import quantizable_tensors
from mlflow_edge.backends.llamacpp.sensitivity import default_type, fixed_bits
from mlflow_edge.errors import EdgeError


def checked_recipe(backend: str, base: Artifact, qtype: str, options: Mapping[str, Any]) -> recipes.Recipe:
    """The ``recipe`` file, validated against the base GGUF and the options before anything is written."""
    recipe = recipes.load_recipe(options["recipe"])
    architecture, names = quantizable_tensors(base.path, not option_bool(options.get("leave_output_tensor", 0)))
    quantized_types = [t for t in quant_types() if t not in UNQUANTIZED]
    recipes.validate_against(recipe, names, architecture, TENSOR_TYPES, backend, default_types=quantized_types)
    used = {rule.type for rule in recipe.rules} | {recipe.default_type if qtype == MIXED else qtype}
    if needs := sorted(used & (TENSOR_TYPES_NEED_IMATRIX | IMATRIX_REQUIRED)):
        if not option_bool(recipes.with_settings(options, recipe).get("imatrix", False)):
            raise EdgeError(f"the recipe's type {needs[0]} needs an importance matrix: set llamacpp.imatrix=true")
    return recipe


def allocated_recipe(backend: str, base: Artifact, qtype: str, options: Mapping[str, Any], table: Any,
                     candidates: Sequence[str], imatrix: Imatrix | None, calibration: Any,
                     source: Any) -> recipes.Recipe:
    """The recipe minimizing the table's predicted error within ``target_bpw`` or ``target_size_mb``."""
    targets = {k: options[k] for k in ("target_bpw", "target_size_mb") if options.get(k) is not None}
    fixed = fixed_bits(base.path, table) if "target_size_mb" in targets else 0
    budget = recipes.budget_bits(table, **targets, fixed_bits=fixed)
    allocation = recipes.allocate(table, budget)
    predicted = {k: float(f"{v:.6g}") for k, v in recipes.predict(table, allocation).items()}
    architecture = quantizable_tensors(base.path)[0]
    measured = {"types": list(candidates), "imatrix": imatrix is not None,
                "error": "fisher" if calibration is not None and source is not None else "squared",
                **({"calib.sha256": calibration.sha256, "chunks": int(options.get("imatrix_chunks") or 16)}
                   if calibration is not None and source is not None else {})}
    settings = {"imatrix": imatrix is not None,  # the types were measured, and are applied, with it
                **({"imatrix_chunks": int(options.get("imatrix_chunks") or 16)} if imatrix is not None else {})}
    return recipes.recipe_from_allocation(
        allocation, backend=backend, architecture=architecture,
        default_type=qtype if qtype != MIXED else default_type(allocation, table),
        source_sha256=base.source_sha256, budget=targets, predicted=predicted, sensitivity=measured,
        settings=settings)
