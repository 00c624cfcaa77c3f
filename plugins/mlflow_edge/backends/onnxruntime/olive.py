"""Olive glue: one pass run on its own (``Pass.run``; no engine, so no footprints) and recorded, the configs of the
RTN and int8 passes for a plan, and the data config that feeds the static quantizer the calibration windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mlflow_edge.backends.onnxruntime.plan import Plan

_CALIBRATION_DATASET = "mlflow_edge_calibration_windows"


def calibration_data_config(feeds: Sequence[Mapping[str, np.ndarray]], folder: Path) -> dict[str, Any]:
    """An Olive data config reading ``feeds`` (saved in ``folder``) through a registered dataset.

    The feeds carry the empty KV cache themselves: Olive's ``LLMAugmentedDataLoader`` would build it from the graph's
    input shapes, and fails on the builder's symbolic head dimension (``kv_cache_dim``)."""
    from olive.data.registry import Registry

    def calibration_windows(path: str) -> list[dict[str, Any]]:
        import torch

        with np.load(path) as saved:
            return [{name: torch.from_numpy(saved[f"{i}/{name}"]) for name in feed_names}
                    for i in range(int(saved["count"]))]

    feed_names = list(feeds[0])
    path = folder / "calibration.npz"
    arrays = {f"{i}/{name}": value for i, feed in enumerate(feeds) for name, value in feed.items()}
    np.savez(path, count=np.array(len(feeds)), **arrays)
    Registry.register_dataset(_CALIBRATION_DATASET)(calibration_windows)
    return {"name": "calibration", "load_dataset_config": {"type": _CALIBRATION_DATASET, "params": {"path": str(path)}},
            "dataloader_config": {"type": "no_auto_batch_dataloader"}}


def run_olive_pass(pass_class: type, config: Mapping[str, Any], model_file: Path, out_dir: Path,
                    record: list[dict[str, Any]]) -> Path:
    """One Olive pass on ``model_file``, written to ``out_dir/model.onnx`` with external data; recorded."""
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict

    out_dir.mkdir()
    olive_pass = create_pass_from_dict(pass_class, {**config, "save_as_external_data": True}, disable_search=True)
    result = olive_pass.run(ONNXModelHandler(model_path=str(model_file.parent), onnx_file_name=model_file.name),
                            str(out_dir))
    record.append({"framework": "olive", **json.loads(json.dumps(olive_pass.to_json(), default=str))})
    return Path(result.model_path)


def rtn_config(plan: Plan, bits: int, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> dict[str, Any]:
    config: dict[str, Any] = {"bits": bits, "block_size": plan.block_size,
                              "is_symmetric": bool(plan.option("is_symmetric", True))}
    if plan.accuracy_level:
        config["accuracy_level"] = plan.accuracy_level
    if include:
        config["nodes_to_include"] = list(include)
    if exclude:
        config["nodes_to_exclude"] = list(exclude)
    return config


def int8_config(plan: Plan) -> dict[str, Any]:
    """Olive's ``OnnxDynamicQuantization``/``OnnxStaticQuantization`` config: MatMuls only (the GenAI graph's
    attention, norms and KV cache are contrib ops that stay float), no pre-processing (it cannot shape-infer them)."""
    config: dict[str, Any] = {"op_types_to_quantize": ["MatMul"], "quant_preprocess": False,
                              "nodes_to_exclude": list(plan.excluded) or None}
    for name in ("per_channel", "reduce_range", "calibrate_method", "quant_format"):
        if plan.option(name) is not None:
            config[name] = plan.option(name)
    if plan.option("weight_type"):
        config["precision"] = plan.option("weight_type")[1:].lower()  # QInt8 -> int8 (Olive's precision names)
    if plan.option("activation_type"):
        config["activation_type"] = plan.option("activation_type")[1:].lower()
    return config
