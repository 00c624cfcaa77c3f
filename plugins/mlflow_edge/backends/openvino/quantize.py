"""An NNCF quantization of a float IR: the base read (and its recipe checked) before anything is written, the
calibration windows, the method ``precision`` names, and the quantized IR saved with its companions and the recipe
it carries."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflow_edge import recipes
from mlflow_edge.backends.base import Artifact
from mlflow_edge.backends.openvino.budget import (
    BUDGET_MODE,
    budget_group_size,
    budget_of,
    compress_within_budget,
)
from mlflow_edge.backends.openvino.calibration import calibration_data
from mlflow_edge.backends.openvino.framework import first_reason, require_nncf, require_openvino
from mlflow_edge.backends.openvino.ir import MODEL_XML, companion_files, model_xml, read_model
from mlflow_edge.backends.openvino.methods import Samples, compress_weights, post_training_quantize
from mlflow_edge.backends.openvino.precision import MIXED, PTQ_PRECISION, RECIPE_FILE
from mlflow_edge.backends.openvino.recipe import apply_recipe, checked_recipe, weight_shapes, written_recipe
from mlflow_edge.errors import EdgeError


def read_base(base: Artifact, precision: str, options: Mapping[str, Any]) -> tuple[Any, recipes.Recipe | None]:
    """The float IR of ``base``, and for :data:`MIXED` with a ``recipe`` that file checked against it."""
    require_nncf()
    require_openvino()
    model = read_model(base.path)
    if precision != MIXED or not options.get("recipe"):
        return model, None
    return model, checked_recipe(options["recipe"], model, model_xml(base.path).parent)


def quantize_ir(model: Any, base: Artifact, out_dir: Path, precision: str, options: Mapping[str, Any],
                runtime: Mapping[str, str], recipe: recipes.Recipe | None, calibration: Any,
                source: Any) -> dict[str, Any]:
    """``model`` (the IR of ``base``) quantized to ``precision`` into ``out_dir``; what the artifact records."""
    base_folder = model_xml(base.path).parent
    if precision == MIXED and recipes.given_budget(options) and not options.get("group_size"):
        options = {**options, "group_size": budget_group_size(weight_shapes(model))}
    tokenizer_folder = Path(source.path) if source is not None else base_folder
    samples, recorded = calibration_data(model, precision, options, calibration, tokenizer_folder)
    compressed, method_recorded = _run_nncf(model, precision, options, samples, runtime, recipe, base)
    recorded.update(method_recorded)
    recorded.update(runtime)
    written = written_recipe(compressed, precision, options, base_folder, base.source_sha256,
                             recipes.given_budget(options))
    out_dir.mkdir(parents=True, exist_ok=True)
    require_openvino().save_model(compressed, str(out_dir / MODEL_XML), compress_to_fp16=False)  # as NNCF left them
    for file in companion_files(base_folder):
        shutil.copyfile(file, out_dir / file.name)
    if written is not None:  # beside the IR, not one of the model's files (their sizes and hashes are the IR's)
        written.save(out_dir / RECIPE_FILE)
        recorded["recipe_sha256"] = written.digest()
    return recorded


def _run_nncf(model: Any, precision: str, options: Mapping[str, Any], samples: Samples, runtime: Mapping[str, str],
              recipe: recipes.Recipe | None, base: Artifact) -> tuple[Any, dict[str, Any]]:
    """``model`` quantized by NNCF the way ``precision`` says, and the options that decided it; one line on failure."""
    nncf = require_nncf()
    try:
        if precision == PTQ_PRECISION:
            return post_training_quantize(nncf, model, options, samples, runtime)
        if precision == MIXED and recipe is None:  # a budget: NNCF's mixed precision at the ratio it leaves room for
            return _within_budget(nncf, model, options, samples, lambda: read_model(base.path))
        if precision == MIXED:
            return apply_recipe(nncf, model, recipe, options)
        return compress_weights(nncf, model, precision, options, samples)
    except EdgeError:
        raise
    except Exception as exc:  # nncf.ValidationError, InvalidGroupSizeError, ParameterNotSupportedError, ...
        raise EdgeError(f"NNCF cannot quantize {base.source_name} to {precision}: {first_reason(exc)}") from exc


def _within_budget(nncf: Any, model: Any, options: Mapping[str, Any], samples: Samples,
                   fresh: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """NNCF's mixed precision over every layer at the smallest ratio, in its own order, that meets the budget."""
    budget = budget_of(model, options)
    chosen = {k: v for k, v in options.items() if k not in recipes.BUDGET_OPTIONS}

    def compress(float_model: Any, ratio: float) -> tuple[Any, dict[str, Any]]:
        return compress_weights(nncf, float_model, BUDGET_MODE, {**chosen, "ratio": ratio, "all_layers": True},
                                samples)

    compressed, recorded = compress_within_budget(budget, compress, model, fresh)
    return compressed, {**recorded, **recipes.given_budget(options)}
