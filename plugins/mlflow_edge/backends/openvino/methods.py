"""NNCF's methods as this backend calls them: weight compression (``nncf.compress_weights``) and INT8
post-training quantization (``nncf.quantize``, with ``max_drop`` ``nncf.quantize_with_accuracy_control``), each
returning the quantized model and the arguments it recorded."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mlflow_edge.backends.base import option_bool
from mlflow_edge.backends.openvino.calibration import inverse_perplexity
from mlflow_edge.backends.openvino.framework import enum_name
from mlflow_edge.backends.openvino.precision import DATA_AWARE
from mlflow_edge.errors import EdgeError

Samples = list[dict[str, np.ndarray]]


def group_arguments(nncf: Any, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``compress_weights`` arguments of the group size options, and their recorded values."""
    kwargs: dict[str, Any] = {}
    recorded: dict[str, Any] = {}
    if "group_size" in options:
        kwargs["group_size"] = recorded["group_size"] = int(options["group_size"])
    if "group_size_fallback_mode" in options:
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        fallback = enum_name(GroupSizeFallbackMode, "group_size_fallback_mode", options["group_size_fallback_mode"])
        kwargs["advanced_parameters"] = AdvancedCompressionParameters(group_size_fallback_mode=fallback)
        recorded["group_size_fallback_mode"] = fallback.name
    return kwargs, recorded


def compress_weights(nncf: Any, model: Any, mode: str, options: Mapping[str, Any],
                     samples: Samples) -> tuple[Any, dict[str, Any]]:
    kwargs, recorded = group_arguments(nncf, options)
    kwargs["mode"] = nncf.CompressWeightsMode[mode]
    if "ratio" in options:
        kwargs["ratio"] = recorded["ratio"] = float(options["ratio"])
    for name in ("all_layers", *DATA_AWARE):
        if name in options:
            kwargs[name] = recorded[name] = option_bool(options[name])
    if "backup_mode" in options:
        kwargs["backup_mode"] = enum_name(nncf.BackupMode, "backup_mode", options["backup_mode"])
        recorded["backup_mode"] = kwargs["backup_mode"].name
    if "sensitivity_metric" in options:
        metric = options["sensitivity_metric"]
        kwargs["sensitivity_metric"] = enum_name(nncf.SensitivityMetric, "sensitivity_metric", metric)
        recorded["sensitivity_metric"] = kwargs["sensitivity_metric"].name
    if samples:
        subset = int(options.get("subset_size", 128))
        kwargs["dataset"] = nncf.Dataset(samples[:subset])
        kwargs["subset_size"] = recorded["subset_size"] = subset
    return nncf.compress_weights(model, **kwargs), recorded


def post_training_quantize(nncf: Any, model: Any, options: Mapping[str, Any], samples: Samples,
                           runtime: Mapping[str, str]) -> tuple[Any, dict[str, Any]]:
    subset = int(options.get("subset_size", 300))
    kwargs: dict[str, Any] = {"model_type": nncf.ModelType.TRANSFORMER, "subset_size": subset}
    recorded: dict[str, Any] = {"subset_size": subset}
    if "preset" in options:
        kwargs["preset"] = enum_name(nncf.QuantizationPreset, "preset", options["preset"])
        recorded["preset"] = kwargs["preset"].name
    if "fast_bias_correction" in options:
        kwargs["fast_bias_correction"] = recorded["fast_bias_correction"] = option_bool(options["fast_bias_correction"])
    if runtime.get("device", "").split(".")[0] in {"CPU", "GPU", "NPU"}:
        kwargs["target_device"] = nncf.TargetDevice[runtime["device"].split(".")[0]]
    if "max_drop" not in options:
        if "drop_type" in options:
            raise EdgeError("drop_type applies only with max_drop (accuracy control)")
        return nncf.quantize(model, nncf.Dataset(samples[:subset]), **kwargs), recorded
    return _accuracy_controlled(nncf, model, options, samples, kwargs, recorded)


def _accuracy_controlled(nncf: Any, model: Any, options: Mapping[str, Any], samples: Samples, kwargs: dict[str, Any],
                         recorded: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``nncf.quantize_with_accuracy_control`` within ``max_drop`` of ``1 / perplexity`` on held-out windows."""
    max_drop = float(options["max_drop"])
    if not 0 <= max_drop < 1:
        raise EdgeError(f"max_drop must be in [0, 1), got {max_drop}")
    drop_type = enum_name(nncf.DropType, "drop_type", options.get("drop_type", "RELATIVE"))
    if len(samples) < 2:
        raise EdgeError("accuracy control needs at least 2 calibration samples (one to calibrate, one to validate)")
    # the last windows (a quarter, at most 16) validate, the rest calibrate: the check never scores a calibration sample
    held_out = max(1, min(len(samples) // 4, 16))
    subset = kwargs["subset_size"]
    calibration, validation = samples[: len(samples) - held_out][:subset], samples[len(samples) - held_out :]
    recorded.update({"max_drop": max_drop, "drop_type": drop_type.name, "validation_samples": len(validation)})
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(calibration), nncf.Dataset(validation), validation_fn=inverse_perplexity,
        max_drop=max_drop, drop_type=drop_type, **kwargs)
    return quantized, recorded
