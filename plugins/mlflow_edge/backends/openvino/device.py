"""The runtime options of an OpenVINO artifact (device, performance hint, inference precision): normalized when a
quantization records them, read from the environment at load time, and the device checked against this machine."""

from __future__ import annotations

import os
from typing import Any, Mapping

from mlflow_edge.errors import EdgeError

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
RUNTIME_OPTIONS = ("device", "performance_hint", "inference_precision")
ENV_PREFIX = "MLFLOW_EDGE_OPENVINO_"


def runtime_options(options: Mapping[str, Any]) -> dict[str, str]:
    """The runtime options among ``options``, normalized (device upper case, hint checked)."""
    runtime = {k: str(options[k]) for k in RUNTIME_OPTIONS if k in options}
    if "device" in runtime:
        runtime["device"] = runtime["device"].upper()
        if runtime["device"].split(".")[0] not in DEVICES:
            raise EdgeError(f"unknown device '{options['device']}' (choose from {', '.join(DEVICES)})")
    if "performance_hint" in runtime:
        runtime["performance_hint"] = runtime["performance_hint"].upper()  # the choices are checked already
    if "inference_precision" in runtime:
        runtime["inference_precision"] = runtime["inference_precision"].lower()
    return runtime


def runtime_from_env() -> dict[str, str]:
    """Runtime options from ``MLFLOW_EDGE_OPENVINO_DEVICE`` / ``_PERFORMANCE_HINT`` / ``_INFERENCE_PRECISION``."""
    return {k: os.environ[ENV_PREFIX + k.upper()] for k in RUNTIME_OPTIONS if os.environ.get(ENV_PREFIX + k.upper())}


def load_settings(artifact_options: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime options an artifact loads with: those it records, the environment's over them."""
    return {**{k: v for k, v in artifact_options.items() if k in RUNTIME_OPTIONS}, **runtime_from_env()}


def check_device(core: Any, device: str) -> str:
    """``device`` upper-cased when OpenVINO has it here (``AUTO`` always), else a one-line error."""
    device = device.upper()
    available = list(core.available_devices)
    family = device.split(".")[0]
    if family == "AUTO" or device in available or (device == family and family in {d.split(".")[0] for d in available}):
        return device
    raise EdgeError(f"OpenVINO device '{device}' is not present on this machine "
                    f"(available: {', '.join(available) or 'none'})")
