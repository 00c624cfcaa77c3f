"""mlx-lm's quantization methods on a loaded model, one function each (uniform, its mixed recipes, a recipe file's
per-layer types, dynamic_quant's sensitivity threshold, AWQ), and the dtype cast that comes before them."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from mlflow_edge import recipes
from mlflow_edge.backends.mlx.precision import Plan, layer_types
from mlflow_edge.backends.mlx.recipe import quantizable_layers


def cast(model: Any, dtype: str) -> Any:
    """Floating parameters to ``dtype`` (what ``mlx_lm.convert --dtype`` does)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(target) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
    return model


def _quantize_uniform(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any], data: Any) -> tuple:
    from mlx_lm.utils import quantize_model

    return quantize_model(model, config, plan.group_size, plan.bits, mode=plan.mode)


def _quantize_recipe(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any], data: Any) -> tuple:
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    group = settings["q_group_size"]
    predicate = mixed_quant_predicate_builder(plan.precision, model, group)
    return quantize_model(model, config, group, None, mode="affine", quant_predicate=predicate)


def _quantize_per_layer(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any],
                        recipe: recipes.Recipe) -> tuple:
    """Each layer at its recipe type (mlx-lm records each as a per-layer entry; unquantized ones are not recorded:
    mlx-lm's loader finds no scales for them). ``config.json``'s model-wide setting is the default type's, else the
    first quantized layer's; the group size handed to mlx-lm, which skips layers it does not divide before asking
    the predicate, is the smallest in use (all are powers of two)."""
    from mlx_lm.utils import quantize_model

    types = layer_types(settings["dtype"])
    entries = {name: types[recipe.type_of(name)] for name in quantizable_layers(model)}
    used = [entry for entry in entries.values() if entry]
    top = types[recipe.default_type] or used[0]
    model, config = quantize_model(model, config, min(entry["group_size"] for entry in used), top["bits"],
                                   mode=top["mode"], quant_predicate=lambda path, _: entries.get(path, False))
    config["quantization"].update(top)
    return model, config


def bpw_range(model: Any, settings: Mapping[str, Any]) -> tuple[float, float]:
    """Bits per weight (mlx-lm's measure) with every layer at the low and at the high setting (lazy: no compute)."""
    import copy

    import mlx.nn as nn
    from mlx_lm.utils import compute_bits_per_weight

    found = []
    for level in ("low", "high"):
        trial = copy.deepcopy(model)
        nn.quantize(trial, group_size=settings[f"{level}_group_size"], bits=settings[f"{level}_bits"])
        found.append(compute_bits_per_weight(trial))
    return found[0], found[1]


def _bpw_at(model: Any, sensitivities: Mapping[str, float], threshold: float, settings: Mapping[str, Any]) -> float:
    """mlx-lm's bits per weight with the layers more sensitive than ``threshold`` at the high setting (lazy)."""
    import copy

    import mlx.nn as nn
    from mlx_lm.utils import compute_bits_per_weight

    high = {"bits": settings["high_bits"], "group_size": settings["high_group_size"]}
    trial = copy.deepcopy(model)
    nn.quantize(trial, group_size=settings["low_group_size"], bits=settings["low_bits"],
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and (high if sensitivities[p] > threshold
                                                                             else True))
    return compute_bits_per_weight(trial)


def _threshold_within(model: Any, sensitivities: Mapping[str, float], threshold: float, target: float,
                      settings: Mapping[str, Any]) -> float:
    """``threshold``, raised past the least sensitive high-bit layers until the target holds: mlx-lm's
    ``estimate_threshold`` returns the middle of its last bracket, which can overshoot by a whole layer (on a model
    whose embedding is most of its weights, by a whole bit)."""
    above = sorted(value for value in sensitivities.values() if value > threshold)
    while above and _bpw_at(model, sensitivities, threshold, settings) > target:
        threshold = above.pop(0)
    return threshold


def _quantize_dynamic(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any], data: Any) -> tuple:
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
    from mlx_lm.utils import quantize_model

    levels = (settings["low_bits"], settings["low_group_size"], settings["high_bits"], settings["high_group_size"])
    sensitivities = dict(estimate_sensitivities(model, data, *levels))
    threshold = estimate_threshold(model, sensitivities, plan.target_bpw, *levels)
    threshold = _threshold_within(model, sensitivities, threshold, plan.target_bpw, settings)

    def predicate(path: str, module: Any) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        if sensitivities[path] > threshold:
            return {"bits": settings["high_bits"], "group_size": settings["high_group_size"]}
        return True

    return quantize_model(model, config, group_size=settings["low_group_size"], bits=settings["low_bits"],
                          quant_predicate=predicate)


def _quantize_awq(model: Any, config: dict, plan: Plan, settings: Mapping[str, Any], data: Any) -> tuple:
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

    awq_quantize(model, data, AWQ_MODEL_CONFIGS[config["model_type"]], group_size=plan.group_size, bits=plan.bits,
                 embed_group_size=settings["embed_group_size"], embed_bits=settings["embed_bits"],
                 n_grid=settings["n_grid"])
    return model, update_config(model, config)


QUANTIZERS: dict[str, Callable[..., tuple]] = {
    "uniform": _quantize_uniform, "recipe": _quantize_recipe, "dynamic": _quantize_dynamic, "awq": _quantize_awq,
    "per_layer": _quantize_per_layer}
"""The quantizer of each :attr:`Plan.method`: ``(model, config, plan, settings, data)`` → ``(model, config)``."""
