"""HF checkpoint → stateful OpenVINO IR through optimum-intel's exporter (what ``optimum-cli export openvino``
runs), without weight compression, and whether optimum-intel has an export for a source at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlflow_edge.backends.openvino.framework import first_reason
from mlflow_edge.backends.openvino.ir import EXPORT_TASK, MODEL_XML
from mlflow_edge.backends.openvino.precision import OPTIMUM_DTYPE
from mlflow_edge.errors import EdgeError


def export_ir(source: Any, out_dir: Path, precision: str) -> None:
    """Write ``source`` as an IR at ``precision`` (``f32``, ``f16``, ``bf16``) into ``out_dir``, with its tokenizer;
    nothing stays behind on failure."""
    if reason := exportable_reason(source):
        raise EdgeError(f"unsupported architecture: {reason}")
    import torch
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    created = not out_dir.exists()
    staging = out_dir / ".export.partial"
    shutil.rmtree(staging, ignore_errors=True)

    def fail(message: str) -> EdgeError:  # leave nothing behind
        shutil.rmtree(out_dir if created else staging, ignore_errors=True)
        return EdgeError(message)

    try:
        # an explicit OVConfig: no weight compression here (optimum would int8-compress models over 1B)
        main_export(str(source.path), output=staging, task=EXPORT_TASK,
                    ov_config=OVConfig(dtype=OPTIMUM_DTYPE[precision]), stateful=True,
                    convert_tokenizer=_has_openvino_tokenizers(), local_files_only=True, trust_remote_code=False,
                    model_loading_kwargs={"torch_dtype": dtype})
    except Exception as exc:  # optimum and the converter raise many classes; one line names the cause
        raise fail(f"optimum-intel cannot export {source.name} to OpenVINO: {first_reason(exc)}") from exc
    if not (staging / MODEL_XML).is_file():
        raise fail(f"optimum-intel wrote no {MODEL_XML} for {source.name}")
    for item in staging.iterdir():
        item.replace(out_dir / item.name)
    staging.rmdir()


def exportable_reason(source: Any) -> str | None:
    """``None`` when optimum-intel exports the source's ``model_type`` as a stateful causal LM, else why not.

    optimum-intel picks its export config by ``model_type`` (not by the architecture class), so that is what counts.
    """
    try:
        import optimum.exporters.openvino  # noqa: F401  (registers the OpenVINO export configs)
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return "optimum-intel is not installed: pip install 'mlflow-edge[openvino]'"
    try:
        model_type = str(json.loads((Path(source.path) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError) as exc:
        return f"cannot read the config of {source.name}: {first_reason(exc)}"
    supported = TasksManager.get_supported_model_type_for_task(EXPORT_TASK, exporter="openvino")
    if model_type.replace("_", "-") in supported or model_type in supported:
        return None
    return (f"optimum-intel has no OpenVINO {EXPORT_TASK} export for {source.architecture} "
            f"(model_type '{model_type}', {len(supported)} model types supported)")


def _has_openvino_tokenizers() -> bool:
    try:
        import openvino_tokenizers  # noqa: F401
    except Exception:  # not installed, or built for another OpenVINO
        return False
    return True
