"""Per-layer recipes on an IR: the recipe type of every weight NNCF compresses, read back from its constant through
NNCF's decompression subgraph; a recipe file checked against the float IR and applied with one ``compress_weights``
per mode; and the recipe an artifact carries (:mod:`mlflow_edge.recipes` holds the format)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Mapping

from mlflow_edge import recipes
from mlflow_edge.backends.base import option_bool
from mlflow_edge.backends.openvino.framework import NAME
from mlflow_edge.backends.openvino.ir import ir_architecture, model_xml
from mlflow_edge.backends.openvino.methods import group_arguments
from mlflow_edge.backends.openvino.precision import (
    DATA_AWARE,
    GROUP_OPTIONS,
    MIXED,
    PTQ_PRECISION,
    RECIPE_MODES,
    RECIPE_TYPES,
    UNCOMPRESSED,
)
from mlflow_edge.errors import EdgeError

# a compressed weight constant's element type, and whether a zero point is subtracted from it -> its NNCF mode
_ELEMENT_MODES = {("i8", False): "INT8_SYM", ("u8", True): "INT8_ASYM", ("i4", False): "INT4_SYM",
                  ("u4", True): "INT4_ASYM", ("nf4", False): "NF4"}
_FLOAT_ELEMENTS = frozenset({"f64", "f32", "f16", "bf16"})
_WEIGHT_PORTS = {"MatMul": (0, 1), "Gather": (0,)}  # the ops NNCF compresses in an LLM, and their constant inputs
_DECOMPRESSION_OPS = frozenset({"Convert", "Reshape", "Subtract", "Multiply"})  # data on input 0
_F16_SUFFIX = "_compressed"
_PATCHED_PREFIX = "_openvino_orig_"


def layer_types(model: Any) -> dict[str, str]:
    """The recipe type of every weight NNCF compresses in ``model`` (a matrix constant on a MatMul input or the data of
    an embedding Gather), by layer name (:func:`_weights`), in graph order: :data:`UNCOMPRESSED` while float, else the
    mode its compressed constant says (element type, and a zero point or not); a tied weight is one entry."""
    return {layer: kind for layer, (_, kind, _) in _weights(model).items()}


def weight_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The shape of every weight NNCF compresses in ``model``, by layer name, as :func:`layer_types` lists them."""
    return {layer: shape for layer, (_, _, shape) in _weights(model).items()}


def _weights(model: Any) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Layer name (:func:`layer_name`) -> (weight constant name, recipe type, the float weight's shape); NNCF's
    ``ignored_scope`` takes the constant's own name."""
    weights: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for op in model.get_ordered_ops():
        for port in _WEIGHT_PORTS.get(op.get_type_name(), ()):
            if found := _weight_type(op.input_value(port)):
                weights.setdefault(layer_name(found[0]), found)
    return weights


def layer_name(constant: str) -> str:
    """The PyTorch parameter a weight constant was exported from (``self.model.layers.0.mlp.down_proj.weight``), so a
    recipe names the weights of an f32, f16 or bf16 IR alike: the constant's name without the ``_compressed`` that
    OpenVINO appends to the constants it stores in f16, nor the ``_openvino_orig_`` prefix under which the PyTorch
    frontend keeps 16-bit weights (``down_proj._openvino_orig_weight``)."""
    module, dot, attribute = constant.removesuffix(_F16_SUFFIX).rpartition(".")
    return module + dot + attribute.removeprefix(_PATCHED_PREFIX)


def _weight_type(value: Any) -> tuple[str, str, tuple[int, ...]] | None:
    """(constant name, recipe type, shape) of the weight behind an op input, through NNCF's decompression subgraph
    (``Convert``, ``Subtract`` of the zero point, ``Multiply`` by the scale, ``Reshape`` of the groups); ``None`` when
    no weight is behind it. The shape is the op input's: a grouped weight's constant is reshaped to it."""
    node, zero_point, scaled = value.get_node(), False, False
    while node.get_type_name() in _DECOMPRESSION_OPS:
        zero_point |= node.get_type_name() == "Subtract"
        scaled |= node.get_type_name() == "Multiply"
        node = node.input_value(0).get_node()
    partial_shape = value.get_partial_shape()
    if node.get_type_name() != "Constant" or partial_shape.is_dynamic:  # activations (a norm's output)
        return None
    element, shape = node.get_output_element_type(0).get_type_name(), list(node.get_output_shape(0))
    weight_shape = tuple(int(n) for n in partial_shape.to_shape())
    if scaled and element not in _FLOAT_ELEMENTS:
        return node.get_friendly_name(), _ELEMENT_MODES.get((element, zero_point), element.upper()), weight_shape
    if not scaled and element in _FLOAT_ELEMENTS and len(shape) >= 2 and min(shape[-2:]) > 1:
        return node.get_friendly_name(), UNCOMPRESSED, weight_shape
    return None


def extract_recipe(kinds: Mapping[str, str], architecture: str, source_sha256: str | None = None,
                   settings: Mapping[str, Any] | None = None,
                   budget: Mapping[str, float] | None = None) -> recipes.Recipe:
    """The per-layer types of a compressed model (``kinds``, :func:`layer_types`) as a recipe: one exact rule per
    layer whose type differs from the most common one, the default; ``settings``: the group size options it was made
    with; ``budget``: the bit budget that chose them."""
    default = collections.Counter(kinds.values()).most_common(1)[0][0]
    return recipes.recipe_from_allocation({name: kind for name, kind in kinds.items() if kind != default},
                                          backend=NAME, architecture=architecture,
                                          default_type=default, source_sha256=source_sha256, settings=settings,
                                          budget=budget or None)


def checked_recipe(path: str, model: Any, folder: Path) -> recipes.Recipe:
    """The recipe file ``path``, validated against the float IR ``model`` before anything is written."""
    recipe = recipes.load_recipe(path)
    architecture = ir_architecture(folder)
    if architecture is None:
        raise EdgeError(f"no config.json with a model_type beside {model_xml(folder)}: a recipe needs the architecture")
    layers = list(layer_types(model))
    recipes.validate_against(recipe, layers, architecture, RECIPE_TYPES, NAME)
    if all(recipe.type_of(name) == UNCOMPRESSED for name in layers):
        raise EdgeError(f"the recipe leaves every layer uncompressed ({UNCOMPRESSED})")
    return recipe


def apply_recipe(nncf: Any, model: Any, recipe: recipes.Recipe,
                 options: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Every layer at its recipe type: one ``compress_weights`` per mode, with every other layer in its
    ``ignored_scope`` (a layer compressed by an earlier call is no float weight any more: NNCF leaves it alone);
    4-bit modes at ``ratio=1``, ``all_layers`` and the group size options, 8-bit ones per channel."""
    weights = _weights(model)
    wanted = {layer: recipe.type_of(layer) for layer in weights}
    group_kwargs, recorded = group_arguments(nncf, options)
    for mode in (m for m in RECIPE_MODES if m in wanted.values()):
        others = [weights[layer][0] for layer, kind in wanted.items() if kind != mode]
        kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode[mode],
                                  "ignored_scope": nncf.IgnoredScope(names=others)}
        if not mode.startswith("INT8"):
            kwargs.update(ratio=1.0, all_layers=True, **group_kwargs)
        model = nncf.compress_weights(model, **kwargs)
    for name, kind in layer_types(model).items():
        if kind != wanted.get(name, kind):
            raise EdgeError(f"NNCF left layer {name} at {kind}, not the recipe's {wanted[name]}")
    return model, {"recipe": str(options["recipe"]), **recorded}


def written_recipe(model: Any, precision: str, options: Mapping[str, Any], folder: Path,
                   source_sha256: str, budget: Mapping[str, float] | None = None) -> recipes.Recipe | None:
    """The recipe an artifact carries: its layers' types when they are more than one (a 4-bit mode keeps some in
    ``backup_mode``) or came from a recipe, all of them :data:`RECIPE_TYPES`, and the architecture known. None after
    a method that changes the weights beyond their types (AWQ, scale estimation, GPTQ, LoRA correction): a recipe
    of its types would not reproduce it."""
    if precision == PTQ_PRECISION or any(option_bool(options.get(name, False)) for name in DATA_AWARE):
        return None
    kinds = layer_types(model)
    found = set(kinds.values())
    architecture = ir_architecture(folder)
    if not found <= set(RECIPE_TYPES) or architecture is None or (len(found) < 2 and precision != MIXED):
        return None
    return extract_recipe(kinds, architecture, source_sha256, {k: options[k] for k in GROUP_OPTIONS if k in options},
                          budget)
