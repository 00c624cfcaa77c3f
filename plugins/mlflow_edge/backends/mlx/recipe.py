"""Per-layer recipes (:mod:`mlflow_edge.recipes`) on MLX: a recipe file in this backend's type names, checked
against the layers mlx-lm quantizes, and the recipe a quantized folder holds, read back as mlx-lm's loader reads it."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow_edge import recipes
from mlflow_edge.backends.mlx.folder import SAFETENSORS_DTYPES, safetensors_header, weight_files
from mlflow_edge.backends.mlx.framework import NAME
from mlflow_edge.backends.mlx.precision import CONVERT_PRECISIONS, layer_types, type_name
from mlflow_edge.errors import EdgeError

RECIPE_FILE = "recipe.json"


def read_recipe(path: str | Path) -> recipes.Recipe:
    """The recipe file ``path`` with its types in this backend's lower-case names (``load_recipe`` upper-cases them,
    as ggml names are): the canonical form whose digest an artifact records."""
    recipe = recipes.load_recipe(path)
    rules = tuple(recipes.Rule(rule.pattern, rule.type.lower()) for rule in recipe.rules)
    return dataclasses.replace(recipe, default_type=recipe.default_type.lower(), rules=rules)


def quantizable_layers(model: Any) -> dict[str, int]:
    """Input width of every layer mlx-lm's quantization visits (leaf modules with ``to_quantized``), by the module
    path its predicate sees, in the order it visits them."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {path: module.weight.shape[-1] for path, module in leaves
            if hasattr(module, "to_quantized") and "weight" in module}


def check_recipe(recipe: recipes.Recipe, widths: Mapping[str, int], architecture: str, dtype: str) -> None:
    """Refuse, in one line, a recipe that does not fit the model whose quantizable layers have ``widths``: another
    backend or architecture, a pattern matching no layer, a type this mlx lacks, a float type other than ``dtype``,
    a group size that does not divide a layer it is given to, or no layer quantized."""
    types = layer_types(dtype)
    recipes.validate_against(recipe, list(widths), architecture, tuple(dict.fromkeys((*types, *CONVERT_PRECISIONS))),
                             NAME)
    for kind in (recipe.default_type, *(rule.type for rule in recipe.rules)):
        if kind not in types:
            raise EdgeError(f"the recipe's type {kind} would leave layers at {kind}, but this quantization keeps "
                            f"unquantized layers at {dtype} (set dtype={kind}, or name {dtype})")
    assigned = {name: types[recipe.type_of(name)] for name in widths}
    for name, entry in assigned.items():
        if entry and widths[name] % entry["group_size"]:
            raise EdgeError(f"the recipe's type {recipe.type_of(name)} does not divide layer {name} "
                            f"({widths[name]} wide)")
    if not any(assigned.values()):
        raise EdgeError(f"the recipe leaves every layer unquantized ({dtype})")


def extract_recipe(folder: Path, layers: Sequence[str], source_sha256: str | None = None,
                   budget: Mapping[str, float] | None = None) -> recipes.Recipe:
    """The type of each of ``layers`` in the quantized MLX ``folder``, as mlx-lm's loader reads it back (the layer's
    entry in ``config.json``'s ``quantization``; else the model-wide setting when the weights hold its scales; else
    unquantized, at its weight's dtype), as one exact rule per layer that differs from the most common type;
    ``budget``: the bit budget that chose them."""
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization") or {}
    tensors = {key: entry for file in weight_files(folder) for key, entry in safetensors_header(file).items()}

    def type_of(name: str) -> str:
        entry = quantization.get(name, quantization if f"{name}.scales" in tensors else False)
        if entry:
            return type_name(entry)
        return SAFETENSORS_DTYPES.get(tensors[f"{name}.weight"]["dtype"], tensors[f"{name}.weight"]["dtype"])

    kinds = {name: type_of(name) for name in layers}
    default = collections.Counter(kinds.values()).most_common(1)[0][0]
    return recipes.recipe_from_allocation({name: kind for name, kind in kinds.items() if kind != default},
                                          backend=NAME, architecture=str(config["model_type"]),
                                          default_type=default, source_sha256=source_sha256,
                                          budget=budget or None)
