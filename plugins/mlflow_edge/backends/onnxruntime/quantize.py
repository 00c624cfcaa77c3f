"""The quantization of a GenAI graph: the plan's main pass (Olive's RTN, k-quant and int8 passes, ONNX Runtime's
own HQQ and GPTQ quantizers), the LM head in int8 when asked, the embedding after them, and the finished folder
stamped with its precision and the record of the passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mlflow_edge.backends.onnxruntime.calibration import decoder_feeds
from mlflow_edge.backends.onnxruntime.embedding import embedding_pass
from mlflow_edge.backends.onnxruntime.folder import (
    METADATA_PRECISION,
    MODEL_FILE,
    QUANTIZATION_RECORD,
    companion_files,
    decoder_file,
    genai_config,
    publish,
    read_graph,
    save_model,
    staging_folder,
)
from mlflow_edge.backends.onnxruntime.framework import require_olive_passes, require_onnx
from mlflow_edge.backends.onnxruntime.olive import calibration_data_config, int8_config, rtn_config, run_olive_pass
from mlflow_edge.backends.onnxruntime.plan import Plan
from mlflow_edge.backends.onnxruntime.precision import INT8_STATIC, WEIGHT_ONLY
from mlflow_edge.errors import EdgeError, first_line


def quantize_graph(folder: Path, staging: Path, plan: Plan, windows: np.ndarray | None) -> tuple[Any, list[dict]]:
    """Run the plan's passes on the model of ``folder``: the quantized graph (weights loaded) and the passes' record."""
    passes = require_olive_passes()
    record: list[dict[str, Any]] = []
    try:
        current = _main_pass(passes, folder, staging, plan, windows, record)
        if plan.option("last_matmul") == "int8":
            config = rtn_config(plan, 8, include=[plan.lm_head])
            current = run_olive_pass(passes["rtn"], config, current, staging / "last_matmul", record)
        model = embedding_pass(passes, current, staging, plan, record)
    except EdgeError:
        raise
    except Exception as exc:  # Olive's and ONNX Runtime's many error classes: one line names the cause
        raise EdgeError(f"ONNX Runtime cannot quantize to {plan.precision}: {first_line(exc)}") from exc
    return model, record


def _main_pass(passes: Mapping[str, type], folder: Path, staging: Path, plan: Plan, windows: np.ndarray | None,
               record: list[dict[str, Any]]) -> Path:
    model_file = folder / decoder_file(folder)
    out = staging / "main"
    algorithm = WEIGHT_ONLY.get(plan.precision, (plan.precision, 8))[0]
    feeds = None
    if windows is not None:
        graph = require_onnx().load(str(model_file), load_external_data=False)
        feeds = decoder_feeds(graph, genai_config(folder), windows)
    if algorithm in ("hqq", "gptq"):
        return _ort_weight_only(algorithm, model_file, out, plan, feeds, record)
    if algorithm == "rtn":
        config = rtn_config(plan, plan.bits, exclude=plan.main_exclusions())
    elif algorithm == "k_quant":
        config = {"bits": plan.bits, "block_size": plan.block_size, "nodes_to_exclude": plan.main_exclusions() or None}
        if plan.accuracy_level:
            config["accuracy_level"] = plan.accuracy_level
    else:
        config = int8_config(plan)
        if plan.precision == INT8_STATIC:
            config["data_config"] = calibration_data_config(feeds, staging)
        algorithm = "static" if plan.precision == INT8_STATIC else "dynamic"
    return run_olive_pass(passes[algorithm], config, model_file, out, record)


def _ort_weight_only(algorithm: str, model_file: Path, out_dir: Path, plan: Plan,
                     feeds: list[dict[str, np.ndarray]] | None, record: list[dict[str, Any]]) -> Path:
    """HQQ or GPTQ by ONNX Runtime's own weight-only quantizers (Olive 0.13's HQQ pass writes blocks the runtime reads
    as other weights; its GPTQ is a PyTorch pass)."""
    onnx = require_onnx()
    model = onnx.load(str(model_file))
    if algorithm == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=plan.main_exclusions(),
                                         algo_config=HQQWeightOnlyQuantConfig(block_size=plan.block_size, bits=4))
        quantizer.process()
        quantized, config = quantizer.model.model, {"bits": 4, "block_size": plan.block_size}
        if plan.accuracy_level:  # HQQ's quantizer does not set it; it is an operator attribute
            _set_accuracy_level(quantized, plan.accuracy_level)
    else:
        quantized, config = _gptq(model, plan, feeds or [])
    config.update(accuracy_level=plan.accuracy_level, nodes_to_exclude=plan.main_exclusions())
    out_dir.mkdir()
    save_model(quantized, out_dir)
    record.append({"framework": "onnxruntime", "type": f"{algorithm.upper()} weight-only", "config": config})
    return out_dir / MODEL_FILE


def _gptq(model: Any, plan: Plan, feeds: list[dict[str, np.ndarray]]) -> tuple[Any, dict[str, Any]]:
    """ONNX Runtime's GPTQ (``gptq_quantize``, what ``MatMulNBitsQuantizer`` runs for ``GPTQWeightOnlyQuantConfig``),
    given a per-node config so that excluded nodes stay float (the quantizer's own GPTQ path ignores exclusions)."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq_quantize

    scheme = "sym" if plan.option("is_symmetric", True) else "asym"
    percdamp = float(plan.option("percdamp", 0.01))
    excluded = set(plan.main_exclusions())
    weight_config: dict[str, Any] = {name: "fp32" for name in excluded}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name not in excluded:
            weight_config[node.name] = {"bits": 4, "group_size": plan.block_size, "scheme": scheme}
    quantized = gptq_quantize(model, [(feed, None) for feed in feeds], weight_config=weight_config, num_bits=4,
                              group_size=plan.block_size, scheme=scheme, n_samples=-1, percdamp=percdamp,
                              accuracy_level=plan.accuracy_level)
    return quantized.model, {"bits": 4, "block_size": plan.block_size, "scheme": scheme, "percdamp": percdamp,
                             "calibration_samples": len(feeds)}


def _set_accuracy_level(model: Any, level: int) -> None:
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])


def write_quantized(folder: Path, staging: Path, plan: Plan, model: Any, record: list[dict],
                     options: Mapping[str, Any]) -> Path:
    """The finished artifact in ``staging/final``: the graph stamped with its precision, its weights, the GenAI
    config and tokenizer of the base, and the record of the passes."""
    final = staging / "final"
    final.mkdir()
    del model.metadata_props[:]
    for key, value in ((METADATA_PRECISION, plan.precision), ("mlflow_edge.options", json.dumps(dict(options)))):
        model.metadata_props.add(key=key, value=value)
    save_model(model, final)
    for file in companion_files(folder):
        shutil.copyfile(file, final / file.name)
    (final / QUANTIZATION_RECORD).write_text(json.dumps({"precision": plan.precision, "passes": record}, indent=2))
    return final


def quantize_folder(folder: Path, out_dir: Path, plan: Plan, windows: np.ndarray | None,
                    recorded: Mapping[str, Any]) -> list[Path]:
    """The plan's passes on the model of ``folder``, the finished folder published into ``out_dir``; its model files
    there."""
    with staging_folder(out_dir, ".quantize.partial") as staging:
        model, record = quantize_graph(folder, staging, plan, windows)
        final = write_quantized(folder, staging, plan, model, record, recorded)
        del model
        _, files = read_graph(final)
        publish(final, out_dir)
        shutil.rmtree(staging)
    return [out_dir / f.name for f in files]
