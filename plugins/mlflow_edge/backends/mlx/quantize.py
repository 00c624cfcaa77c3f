"""An MLX quantization before and around mlx-lm's methods: each method's options and defaults, the checks made
before any work (group sizes, recipe, architecture, dynamic target), the arguments recorded, the calibration windows,
and the load → fuse → cast → quantize → save sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mlflow_edge import recipes
from mlflow_edge.backends.mlx.adapters import adapter_sha256, check_adapter, copy_adapter, fuse_adapter
from mlflow_edge.backends.mlx.folder import (
    check_folder,
    folder_precision,
    legacy_rope_keys,
    safetensors_header,
    weight_files,
    writing_into,
)
from mlflow_edge.backends.mlx.framework import mlx_call
from mlflow_edge.backends.mlx.precision import MIXED, Plan, affine_bits, check_bits_and_group
from mlflow_edge.backends.mlx.quantizers import QUANTIZERS, bpw_range, cast
from mlflow_edge.backends.mlx.recipe import (
    RECIPE_FILE,
    check_recipe,
    extract_recipe,
    quantizable_layers,
    read_recipe,
)
from mlflow_edge.errors import EdgeError

_DYNAMIC_OPTIONS = ("low_bits", "low_group_size", "high_bits", "high_group_size")
_AWQ_OPTIONS = ("embed_bits", "embed_group_size", "n_grid")
_DATA_OPTIONS = ("num_samples", "sequence_length")
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "recipe": {"q_group_size": 64},
    "dynamic": {"low_bits": 4, "low_group_size": 64, "high_bits": 5, "high_group_size": 64, "num_samples": 8,
                "sequence_length": 128},
    "awq": {"embed_bits": 4, "embed_group_size": 32, "n_grid": 20, "num_samples": 8, "sequence_length": 128},
    "per_layer": {},
}
_METHOD_OPTIONS = {"uniform": (), "recipe": ("q_group_size",), "dynamic": (*_DYNAMIC_OPTIONS, *_DATA_OPTIONS),
                   "awq": (*_AWQ_OPTIONS, *_DATA_OPTIONS), "per_layer": ("recipe",)}
PER_LAYER_METHODS = ("recipe", "dynamic", "per_layer")
"""Methods whose weights are a plain quantization of each layer at its own type: their artifacts carry a recipe
that reproduces them (AWQ rescales the weights first; a recipe of its types would not)."""
_COMMON_OPTIONS = ("dtype", "adapter_path", "fuse_adapter")


def budget_plan(plan: Plan, options: Mapping[str, Any], folder: Path) -> tuple[Plan, dict[str, Any]]:
    """A :data:`MIXED` budget (``target_bpw`` / ``target_size_mb``) as mlx-lm's ``dynamic_quant`` at that target,
    its low and high bits (groups of 64) the affine levels on either side of it where the options leave them unset;
    any other plan and options as they are."""
    budget = recipes.given_budget(options)
    if not budget:
        return plan, dict(options)
    if plan.method != "per_layer":
        raise EdgeError(f"{', '.join(budget)} applies with precision {MIXED}, not {plan.precision}")
    if options.get("recipe"):
        raise EdgeError(f"give one of recipe, target_bpw and target_size_mb, not {' and '.join(['recipe', *budget])}")
    settings = dict(options)
    target = recipes.budget_bpw(_parameters(folder), **budget)
    dtype = settings.get("dtype") or folder_precision(folder, check_folder(folder))
    per_group = 2 * (32 if dtype == "float32" else 16) / 64  # a scale and a bias per group of 64, in the dtype
    levels = affine_bits()
    # strictly below: the unquantized norms put a level a little above its nominal bits, so a target at a level
    # lies between the level under it and that one
    low = max((bits for bits in levels if bits + per_group < target), default=levels[0])
    high = min((bits for bits in levels if bits > low and bits + per_group >= target), default=levels[-1])
    settings = {"low_bits": low, "high_bits": high, **settings}
    return Plan(MIXED, "dynamic", target_bpw=target), settings


def _parameters(folder: Path) -> int:
    """The parameter count of a float MLX folder, from its safetensors headers."""
    return sum(int(np.prod(entry["shape"])) for file in weight_files(folder)
               for name, entry in safetensors_header(file).items() if name != "__metadata__")


def method_settings(plan: Plan, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``plan``'s method with its defaults; options of another method are refused."""
    allowed = set(_METHOD_OPTIONS[plan.method]) | set(_COMMON_OPTIONS)
    if plan.precision == MIXED and plan.method == "dynamic":  # a budget (budget_plan)
        allowed |= set(recipes.BUDGET_OPTIONS)
    if misplaced := sorted(set(options) - allowed):
        raise EdgeError(f"{', '.join(misplaced)} do(es) not apply to {plan.precision}"
                        f"{f' (a recipe applies with precision {MIXED})' if 'recipe' in misplaced else ''}")
    if plan.method == "per_layer" and not options.get("recipe"):
        raise EdgeError(f"precision {MIXED} needs recipe=<a recipe JSON file>, target_bpw=<bits> or "
                        "target_size_mb=<MB>")
    settings = {**_METHOD_DEFAULTS[plan.method], **options}
    for bits, group in (("low_bits", "low_group_size"), ("high_bits", "high_group_size"),
                        ("embed_bits", "embed_group_size")):
        if bits in settings:
            check_bits_and_group(settings[bits], settings[group])
    if plan.method == "dynamic" and settings["high_bits"] <= settings["low_bits"]:
        raise EdgeError(f"high_bits ({settings['high_bits']}) must exceed low_bits ({settings['low_bits']})")
    for name in ("num_samples", "sequence_length", "n_grid"):
        if name in settings and settings[name] < 1:
            raise EdgeError(f"{name} must be positive, got {settings[name]}")
    return settings


def _group_sizes_used(plan: Plan, settings: Mapping[str, Any]) -> dict[str, int]:
    if plan.method == "per_layer":
        return {}  # per layer: check_recipe
    if plan.method == "recipe":
        return {"q_group_size": settings["q_group_size"]}
    if plan.method == "dynamic":
        return {"low_group_size": settings["low_group_size"], "high_group_size": settings["high_group_size"]}
    groups = {"group size": int(plan.group_size)}
    if plan.method == "awq":
        groups["embed_group_size"] = settings["embed_group_size"]
    return groups


def check_layers(folder: Path, plan: Plan, settings: Mapping[str, Any],
                 recipe: recipes.Recipe | None = None) -> dict[str, int]:
    """Before any work: the group sizes divide every quantizable layer, the recipe fits the model, mlx-lm's recipe or
    AWQ knows the architecture, a dynamic target is within reach. Returns the widths of the quantizable layers."""
    from mlx_lm.utils import load_model

    model, config = mlx_call(f"load {folder}", lambda: load_model(folder, lazy=True))
    widths = quantizable_layers(model)
    if recipe is not None:
        check_recipe(recipe, widths, str(config.get("model_type")), settings["dtype"])
    for option, group in _group_sizes_used(plan, settings).items():
        if bad := sorted(name for name, width in widths.items() if width % group):
            raise EdgeError(f"{option} {group} does not divide layer {bad[0]} ({widths[bad[0]]} wide"
                            f"{f', and {len(bad) - 1} more' if len(bad) > 1 else ''})")
    if plan.method == "recipe":
        from mlx_lm.convert import mixed_quant_predicate_builder

        mlx_call(f"apply {plan.precision}", lambda: mixed_quant_predicate_builder(plan.precision, model))
    if plan.method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS

        if config["model_type"] not in AWQ_MODEL_CONFIGS:
            raise EdgeError(f"mlx-lm has no AWQ config for model_type '{config['model_type']}' "
                            f"(it has {', '.join(sorted(AWQ_MODEL_CONFIGS))})")
    if plan.method == "dynamic":
        low, high = bpw_range(cast(model, settings["dtype"]), settings)
        if not low <= plan.target_bpw <= high:
            raise EdgeError(f"a target of {plan.target_bpw:.3g} bits per weight is outside the {low:.2f}-{high:.2f} "
                            f"that low_bits={settings['low_bits']} and high_bits={settings['high_bits']} reach at "
                            f"dtype {settings['dtype']}")
    return widths


def recorded_arguments(plan: Plan, settings: Mapping[str, Any], adapter: Path | None) -> dict[str, Any]:
    """The mlx-lm arguments a quantization used, under mlx-lm's names (logged as ``mlx.<name>`` params)."""
    recorded: dict[str, Any] = {"dtype": settings["dtype"]}
    if plan.method in ("uniform", "awq"):
        recorded.update({"q_bits": plan.bits, "q_group_size": plan.group_size, "q_mode": plan.mode})
    if plan.method == "recipe":
        recorded.update({"quant_predicate": plan.precision, "q_group_size": settings["q_group_size"]})
    if plan.method == "dynamic":
        recorded["target_bpw"] = plan.target_bpw
        recorded.update(recipes.given_budget(settings))
    for name in (*_METHOD_OPTIONS[plan.method],):
        recorded.setdefault(name, settings[name])
    if adapter is not None:
        recorded.update({"adapter": adapter.name, "adapter.sha256": adapter_sha256(adapter),
                         "fuse_adapter": bool(settings.get("fuse_adapter", False))})
    return recorded


def calibration_windows(calibration: Any, folder: Path, num_samples: int, sequence_length: int) -> Any:
    """``num_samples`` consecutive windows of ``sequence_length`` calibration tokens, ``[num_samples, length]``."""
    import mlx.core as mx
    from transformers import AutoTokenizer

    if calibration is None:
        raise EdgeError("this MLX precision reads calibration text; none was given")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(calibration.text(), add_special_tokens=False)["input_ids"]
    needed = num_samples * sequence_length
    if len(ids) < needed:
        raise EdgeError(f"calibration text {calibration.label} has {len(ids)} tokens; {needed} are needed "
                        f"({num_samples} windows of {sequence_length})")
    return mx.array(np.asarray(ids[:needed], dtype=np.int32).reshape(num_samples, sequence_length))


def quantize_into(staging: Path, folder: Path, plan: Plan, settings: Mapping[str, Any], adapter: Path | None,
                  data: Any) -> None:
    """Load the base folder (fusing the adapter when asked), cast, quantize by ``plan``'s method and save into
    ``staging``; an adapter that is not fused travels in the artifact."""
    from mlx_lm.utils import load, save

    fuse = adapter is not None and settings.get("fuse_adapter", False)
    legacy = legacy_rope_keys(json.loads((folder / "config.json").read_text()))
    model, tokenizer, config = mlx_call(f"load {folder}", lambda: load(
        str(folder), lazy=True, return_config=True, adapter_path=str(adapter) if fuse else None, model_config=legacy))
    if fuse:
        model = fuse_adapter(model)
    model = cast(model, settings["dtype"])
    model, config = mlx_call(f"quantize to {plan.precision}",
                             lambda: QUANTIZERS[plan.method](model, config, plan, settings, data))
    mlx_call(f"save {plan.precision}", lambda: save(staging, folder, model, tokenizer, config))
    if adapter is not None and not fuse:
        copy_adapter(adapter, staging)


def quantize_folder(base: Any, out_dir: Path, plan: Plan, settings: dict[str, Any],
                    calibration: Any) -> dict[str, Any]:
    """Quantize the float MLX folder of ``base`` by ``plan`` into ``out_dir``, every check made before anything is
    written; the arguments it used (a per-layer method's folder carries its recipe, whose digest is among them)."""
    folder = Path(base.path)
    config = check_folder(folder)
    settings.setdefault("dtype", folder_precision(folder, config))
    recipe = read_recipe(settings["recipe"]) if plan.method == "per_layer" else None
    layers = check_layers(folder, plan, settings, recipe)
    adapter = Path(settings["adapter_path"]) if settings.get("adapter_path") else None
    if adapter is not None:
        check_adapter(adapter, folder)
    recorded = recorded_arguments(plan, settings, adapter)
    data: Any = recipe  # what the method reads: the recipe, or calibration windows
    if plan.method in ("dynamic", "awq"):
        data = calibration_windows(calibration, folder, settings["num_samples"], settings["sequence_length"])
        recorded.update({"calib.dataset": calibration.label, "calib.sha256": calibration.sha256})
    with writing_into(out_dir) as staging:
        quantize_into(staging, folder, plan, settings, adapter, data)
        if plan.method in PER_LAYER_METHODS:
            written = extract_recipe(staging, list(layers), base.source_sha256, recipes.given_budget(settings))
            written.save(staging / RECIPE_FILE)
            recorded["recipe_sha256"] = written.digest()
    return recorded
