"""The ONNX Runtime backend on a tiny random Llama: the real ONNX Runtime GenAI model builder, real Olive passes and
ONNX Runtime quantizers, the real GenAI runtime. The slow tests use SmolLM2-135M and the real ``olive auto-opt``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna
import pytest

from mlflow_edge import artifacts
from mlflow_edge.backends import get_backend
from mlflow_edge.backends.base import Artifact
from mlflow_edge.backends.onnxruntime import (
    MODEL_FILE,
    QUANTIZE_PRECISIONS,
    ONNXRuntimeBackend,
    ONNXRuntimeGenAIRunner,
    available_execution_providers,
)
from mlflow_edge.errors import EdgeError
from mlflow_edge.evaluation.data import TextSlice, calibration_text, evaluation_text
from mlflow_edge.sources import SourceModel, from_folder

pytest.importorskip("onnxruntime_genai")

DATA = MODEL_FILE + ".data"
MATMULS = 11  # qkv, o, gate, up, down in 2 layers, and the LM head
SMALL_CALIBRATION = {"calibration_samples": 2, "calibration_tokens": 32}


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, f"not a one-line error: {message!r}"
    return message


def nothing_left(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def graph(artifact: Artifact) -> onnx.ModelProto:
    return onnx.load(str(artifact.path / MODEL_FILE), load_external_data=False)


def ops(artifact: Artifact) -> Counter:
    return Counter(node.op_type for node in graph(artifact).graph.node)


def nodes(artifact: Artifact, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in graph(artifact).graph.node if node.op_type == op_type]


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Centered relative error of logits: 0 for the same predictions, about 1.4 for unrelated ones."""
    centered = expected - expected.mean(axis=-1, keepdims=True)
    shifted = actual - actual.mean(axis=-1, keepdims=True)
    return float(np.linalg.norm(shifted - centered) / np.linalg.norm(centered))


@pytest.fixture(scope="module")
def backend() -> ONNXRuntimeBackend:
    return ONNXRuntimeBackend()


@pytest.fixture(scope="module")
def fp32(tiny_source: SourceModel) -> Artifact:
    return artifacts.convert(tiny_source, "onnxruntime", "fp32")


@pytest.fixture(scope="module")
def tokens(tiny_source: SourceModel) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_source.path)
    return tokenizer(evaluation_text().text()[:2000], add_special_tokens=False)["input_ids"][:48]


def logits_of(backend: ONNXRuntimeBackend, artifact: Artifact, tokens: list[int]) -> np.ndarray:
    runner = backend.load(artifact, threads=2, context_tokens=64)
    try:
        return runner.logits(tokens)
    finally:
        runner.close()


@pytest.fixture(scope="module")
def base_logits(backend: ONNXRuntimeBackend, fp32: Artifact, tokens: list[int]) -> np.ndarray:
    return logits_of(backend, fp32, tokens)


# the quantizations the tests look at, each made once: (precision, options)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "int4_rtn": ("int4_rtn", {}),
    "int4_rtn_asym_b64": ("int4_rtn", {"is_symmetric": False, "block_size": 64, "accuracy_level": 0}),
    "int4_rtn_head_int8": ("int4_rtn", {"last_matmul": "int8"}),
    "int4_rtn_head_float": ("int4_rtn", {"last_matmul": "float"}),
    "int4_k_quant": ("int4_k_quant", {"last_matmul": "int8"}),  # k-quant of the 12.6M-weight head takes seconds
    "int4_hqq": ("int4_hqq", {"last_matmul": "int8"}),
    "int4_gptq": ("int4_gptq", {"last_matmul": "int8", **SMALL_CALIBRATION}),
    "int8_rtn": ("int8_rtn", {}),
    "int8_dynamic": ("int8_dynamic", {}),
    "int8_dynamic_per_channel": ("int8_dynamic", {"per_channel": True, "reduce_range": True, "weight_type": "QUInt8"}),
    "int8_static": ("int8_static", {"calibration_samples": 4, "calibration_tokens": 32}),
    "int8_static_qoperator": ("int8_static", {"quant_format": "QOperator", "calibrate_method": "Entropy",
                                              **SMALL_CALIBRATION}),
}


@pytest.fixture(scope="module")
def quantized(backend: ONNXRuntimeBackend, fp32: Artifact, tiny_source: SourceModel,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    root = tmp_path_factory.mktemp("onnx-quantized")
    return {name: backend.quantize(fp32, root / name, precision, options, calibration=calibration_text(),
                                   source=tiny_source)
            for name, (precision, options) in VARIANTS.items()}


# -- convert -------------------------------------------------------------------------------------------------------
def test_convert_writes_a_genai_model_folder(fp32: Artifact, tiny_source: SourceModel) -> None:
    assert fp32.backend == "onnxruntime" and fp32.format == "onnx" and fp32.precision == "fp32"
    assert fp32.files == (fp32.path / MODEL_FILE, fp32.path / DATA)
    assert fp32.source_sha256 == tiny_source.sha256 and fp32.num_parameters == tiny_source.num_parameters
    assert fp32.options == {"builder_execution_provider": "cpu"}
    names = {p.name for p in fp32.path.iterdir()}
    assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not {".export.partial", ".builder-cache"} & names  # no staging or builder cache left
    model = graph(fp32)
    inputs = [i.name for i in model.graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"] and len(inputs) == 6  # + key and value of 2 layers
    assert [o.name for o in model.graph.output][0] == "logits"
    assert ops(fp32)["GroupQueryAttention"] == 2 and ops(fp32)["MatMul"] == MATMULS
    # the tied embedding is the LM head's weight, stored once: 4 bytes per parameter
    assert fp32.size_bytes == pytest.approx(4 * tiny_source.num_parameters, rel=0.02)
    config = json.loads((fp32.path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == MODEL_FILE and config["model"]["type"] == "llama"


def test_convert_fp16_and_aliases(backend: ONNXRuntimeBackend, tiny_source: SourceModel, fp32: Artifact,
                                  base_logits: np.ndarray, tokens: list[int], tmp_path: Path) -> None:
    fp16 = backend.convert(tiny_source, tmp_path / "fp16", "F16")  # optimum-style names are accepted
    assert fp16.precision == "fp16" and fp16.size_bytes == pytest.approx(fp32.size_bytes / 2, rel=0.02)
    assert fp16.options == {"builder_execution_provider": "cuda"}  # the builder's GPU graph, run here on the CPU
    assert backend.open_artifact(fp16.path, tiny_source).precision == "fp16"
    logits = logits_of(backend, fp16, tokens)
    assert logits.dtype == np.float32 and relative_error(logits, base_logits) < 0.01
    # the builder's fp16 graph quantizes with RTN; the int8 quantizers need float32 activations
    int4 = backend.quantize(fp16, tmp_path / "int4", "int4_rtn")
    assert int4.size_bytes < fp16.size_bytes / 3 and relative_error(logits_of(backend, int4, tokens), logits) < 0.5
    for artifact in (fp16, int4):  # decoding with the KV cache works (the builder's fp16 CPU graph fails there)
        runner = backend.load(artifact, threads=2, context_tokens=64)
        try:
            assert runner.generate(tokens[:16], 8).generated_tokens == 8
        finally:
            runner.close()
    with pytest.raises(EdgeError, match="int8_dynamic quantizes the fp32 conversion") as exc:
        backend.quantize(fp16, tmp_path / "dynamic", "int8_dynamic")
    one_line(exc)
    assert nothing_left(tmp_path / "dynamic")
    assert artifacts.convert(tiny_source, "onnxruntime", "FP32") == fp32  # cached


def test_unknown_conversion_type_is_refused(backend: ONNXRuntimeBackend, tiny_source: SourceModel,
                                            tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="unknown ONNX Runtime GenAI conversion type 'int4'") as exc:
        backend.convert(tiny_source, tmp_path / "out", "int4")
    assert "fp32, fp16" in one_line(exc)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_refused(backend: ONNXRuntimeBackend, tiny_source: SourceModel,
                                            tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    source = dataclasses.replace(tiny_source, name="bert", path=folder, architecture="BertForMaskedLM")
    assert backend.unsupported_reason(tiny_source) is None
    assert "cannot export BertForMaskedLM" in backend.unsupported_reason(source)
    whisper = dataclasses.replace(source, architecture="WhisperForConditionalGeneration")
    assert backend.unsupported_reason(whisper) is not None  # the builder exports it, but it is no causal LM
    with pytest.raises(EdgeError, match="^unsupported architecture: the ONNX Runtime GenAI model builder") as exc:
        backend.convert(source, tmp_path / "out", "fp32")
    one_line(exc)
    with pytest.raises(EdgeError, match="^unsupported architecture: .*BertForMaskedLM"):
        artifacts.convert(source, "onnxruntime", "fp32")
    assert not (tmp_path / "out").exists()


# -- weight-only quantization ----------------------------------------------------------------------------------------
def test_int4_rtn_defaults_share_the_tied_embedding(quantized: dict[str, Artifact], fp32: Artifact,
                                                   tiny_source: SourceModel) -> None:
    artifact = quantized["int4_rtn"]
    # int8 compute of the activations (accuracy_level 4) is the builder's CPU default, and decodes ~15x faster here
    assert artifact.precision == "int4_rtn"
    assert artifact.options == {"block_size": 32, "accuracy_level": 4, "base_precision": "fp32"}
    matmuls = nodes(artifact, "MatMulNBits")
    assert len(matmuls) == MATMULS and "MatMul" not in ops(artifact)
    assert {(attrs(n)["bits"], attrs(n)["block_size"], attrs(n)["accuracy_level"]) for n in matmuls} == {(4, 32, 4)}
    assert all(len(n.input) == 3 for n in matmuls)  # symmetric: no zero points
    # the embedding reads the LM head's int4 blocks, as the builder's own int4 export does
    gather = nodes(artifact, "GatherBlockQuantized")
    assert len(gather) == 1 and attrs(gather[0])["bits"] == 4 and "Transpose" not in ops(artifact)
    head = next(n for n in matmuls if n.output[0] == "logits")
    assert nodes(artifact, "Reshape")[0].input[0] == head.input[1]
    # 4 bits + a float32 scale per 32 weights, with the embedding stored once: about 5 bits per parameter
    assert artifact.size_bytes == pytest.approx(tiny_source.num_parameters * (0.5 + 4 / 32), rel=0.05)
    metadata = {p.key: p.value for p in graph(artifact).metadata_props}
    assert metadata["mlflow_edge.precision"] == "int4_rtn"
    record = json.loads((artifact.path / "quantization.json").read_text())
    assert [p["type"] for p in record["passes"]] == ["OnnxBlockWiseRtnQuantization"]
    assert record["passes"][0]["config"]["block_size"] == 32
    assert {"genai_config.json", "tokenizer.json"} <= {p.name for p in artifact.path.iterdir()}
    assert artifact.files == (artifact.path / MODEL_FILE, artifact.path / DATA)


def test_block_size_symmetry_and_accuracy_level(quantized: dict[str, Artifact]) -> None:
    artifact = quantized["int4_rtn_asym_b64"]
    assert artifact.options == {"is_symmetric": False, "block_size": 64, "accuracy_level": 0, "base_precision": "fp32"}
    for node in nodes(artifact, "MatMulNBits"):
        assert attrs(node)["block_size"] == 64 and "accuracy_level" not in attrs(node)  # 0: unset, Olive's default
        assert len(node.input) == 4  # asymmetric: uint4 zero points
    gather = nodes(artifact, "GatherBlockQuantized")[0]
    assert attrs(gather)["block_size"] == 64 and len(gather.input) == 4  # the head's zero points, shared too
    assert artifact.size_bytes < quantized["int4_rtn"].size_bytes  # fewer scales


def test_last_matmul_in_int8_or_float(quantized: dict[str, Artifact], fp32: Artifact) -> None:
    head_int8 = quantized["int4_rtn_head_int8"]
    bits = {n.output[0]: attrs(n)["bits"] for n in nodes(head_int8, "MatMulNBits")}
    assert bits.pop("logits") == 8 and set(bits.values()) == {4}
    assert attrs(nodes(head_int8, "GatherBlockQuantized")[0])["bits"] == 8
    head_float = quantized["int4_rtn_head_float"]
    assert ops(head_float)["MatMul"] == 1 and ops(head_float)["Transpose"] == 1  # float head, the embedding tied to it
    assert quantized["int4_rtn"].size_bytes < head_int8.size_bytes < head_float.size_bytes < fp32.size_bytes


def test_k_quant_hqq_and_int8_rtn(quantized: dict[str, Artifact], backend: ONNXRuntimeBackend, tokens: list[int],
                                  base_logits: np.ndarray) -> None:
    k_quant, hqq, int8 = quantized["int4_k_quant"], quantized["int4_hqq"], quantized["int8_rtn"]
    record = json.loads((k_quant.path / "quantization.json").read_text())["passes"]
    assert [p["type"] for p in record] == ["OnnxKQuantQuantization", "OnnxBlockWiseRtnQuantization"]
    assert all(len(n.input) == 4 for n in nodes(k_quant, "MatMulNBits") if n.output[0] != "logits")  # zero points
    assert json.loads((hqq.path / "quantization.json").read_text())["passes"][0]["type"] == "HQQ weight-only"
    assert {attrs(n)["bits"] for n in nodes(int8, "MatMulNBits")} == {8}
    assert attrs(nodes(int8, "GatherBlockQuantized")[0])["bits"] == 8
    errors = {name: relative_error(logits_of(backend, quantized[name], tokens), base_logits)
              for name in ("int4_rtn", "int4_k_quant", "int4_hqq", "int8_rtn")}
    assert max(errors.values()) < 0.5, errors  # quantization noise, not another model (about 1.4)
    assert errors["int8_rtn"] < errors["int4_rtn"] / 4, errors


def test_gptq_reads_calibration_text(quantized: dict[str, Artifact], backend: ONNXRuntimeBackend,
                                     tokens: list[int], base_logits: np.ndarray) -> None:
    artifact = quantized["int4_gptq"]
    calibration = calibration_text()
    assert artifact.options["calib.dataset"] == calibration.label
    assert artifact.options["calib.sha256"] == calibration.sha256
    assert artifact.options["calibration_samples"] == 2 and artifact.options["calibration_tokens"] == 32
    record = json.loads((artifact.path / "quantization.json").read_text())["passes"]
    assert record[0]["type"] == "GPTQ weight-only" and record[0]["config"]["calibration_samples"] == 2
    bits = {n.output[0]: attrs(n)["bits"] for n in nodes(artifact, "MatMulNBits")}
    assert bits.pop("logits") == 8 and set(bits.values()) == {4}  # last_matmul=int8 honoured by GPTQ too
    assert relative_error(logits_of(backend, artifact, tokens), base_logits) < 0.5


def test_nodes_to_exclude_stay_float(backend: ONNXRuntimeBackend, fp32: Artifact, tmp_path: Path) -> None:
    excluded = "/model/layers.0/mlp/down_proj/MatMul"
    artifact = backend.quantize(fp32, tmp_path / "q", "int4_rtn", {"nodes_to_exclude": excluded})
    assert [n.name for n in nodes(artifact, "MatMul")] == [excluded]
    with pytest.raises(EdgeError, match="nodes_to_exclude names no node of the model: /no/such") as exc:
        backend.quantize(fp32, tmp_path / "bad", "int4_rtn", {"nodes_to_exclude": "/no/such"})
    one_line(exc)
    assert nothing_left(tmp_path / "bad")


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="Olive 0.13's OnnxHqqQuantization writes MatMulNBits blocks that ONNX Runtime 1.32 reads as "
                          "other weights (relative logit error about 1.5): this backend runs ONNX Runtime's own HQQ; "
                          "when this passes, Olive's pass can take over")
def test_olive_hqq_pass_gives_the_same_model(fp32: Artifact, tokens: list[int], base_logits: np.ndarray,
                                             tmp_path: Path) -> None:
    import onnxruntime as ort
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.hqq_quantization import OnnxHqqQuantization

    config = {"block_size": 32, "nodes_to_exclude": ["/lm_head/MatMul"], "save_as_external_data": True}
    (tmp_path / "hqq").mkdir()
    result = create_pass_from_dict(OnnxHqqQuantization, config, disable_search=True).run(
        ONNXModelHandler(model_path=str(fp32.path), onnx_file_name=MODEL_FILE), str(tmp_path / "hqq"))
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([tokens], dtype=np.int64), "attention_mask": np.ones((1, len(tokens)), np.int64)}
    for graph_input in session.get_inputs()[2:]:
        feeds[graph_input.name] = np.zeros((1, 2, 0, 64), dtype=np.float32)
    logits = session.run([session.get_outputs()[0].name], feeds)[0][0]
    assert relative_error(logits, base_logits) < 0.5


# -- int8 ------------------------------------------------------------------------------------------------------------
def test_int8_dynamic(quantized: dict[str, Artifact], backend: ONNXRuntimeBackend, tokens: list[int],
                      base_logits: np.ndarray, fp32: Artifact) -> None:
    plain, per_channel = quantized["int8_dynamic"], quantized["int8_dynamic_per_channel"]
    assert ops(plain)["MatMulInteger"] == MATMULS and ops(plain)["DynamicQuantizeLinear"] > 0
    assert plain.options == {"base_precision": "fp32"}
    assert per_channel.options == {"per_channel": True, "reduce_range": True, "weight_type": "QUInt8",
                                   "base_precision": "fp32"}
    config = json.loads((per_channel.path / "quantization.json").read_text())["passes"][0]
    assert config["type"] == "OnnxDynamicQuantization" and config["config"]["per_channel"] is True
    # the head's int8 weight is no block format the embedding can read: the embedding gets its own int8 blocks
    gather = nodes(plain, "GatherBlockQuantized")
    assert len(gather) == 1 and attrs(gather[0])["bits"] == 8 and "Transpose" not in ops(plain)
    assert plain.size_bytes < 0.55 * fp32.size_bytes
    for artifact in (plain, per_channel):
        assert relative_error(logits_of(backend, artifact, tokens), base_logits) < 0.2


def test_int8_static_calibrates_on_the_kv_cache_graph(quantized: dict[str, Artifact], backend: ONNXRuntimeBackend,
                                                     tokens: list[int], base_logits: np.ndarray) -> None:
    qdq, qoperator = quantized["int8_static"], quantized["int8_static_qoperator"]
    assert ops(qdq)["QuantizeLinear"] > 0 and ops(qdq)["DequantizeLinear"] > 0 and ops(qdq)["MatMul"] == MATMULS
    assert ops(qoperator)["QLinearMatMul"] == MATMULS
    assert ops(qdq)["GroupQueryAttention"] == 2  # attention and the KV cache stay float
    assert qdq.options["calib.dataset"] == calibration_text().label and qdq.options["calibration_samples"] == 4
    assert qoperator.options["calibrate_method"] == "Entropy" and qoperator.options["quant_format"] == "QOperator"
    record = json.loads((qdq.path / "quantization.json").read_text())["passes"][0]
    assert record["type"] == "OnnxStaticQuantization"
    for artifact in (qdq, qoperator):
        assert relative_error(logits_of(backend, artifact, tokens), base_logits) < 0.2


# -- bad input -------------------------------------------------------------------------------------------------------
def test_options_are_checked_before_anything_is_written(backend: ONNXRuntimeBackend, fp32: Artifact,
                                                       tmp_path: Path) -> None:
    cases = [
        ("INT5_RTN", {}, "unknown ONNX Runtime quantization precision 'int5_rtn'"),
        ("int4_rtn", {"per_channel": True}, "option per_channel applies to int8_dynamic, int8_static, not int4_rtn"),
        ("int4_k_quant", {"is_symmetric": True}, "option is_symmetric applies to int4_rtn, int4_gptq, int8_rtn"),
        ("int8_rtn", {"last_matmul": "int8"}, "last_matmul=int8 changes nothing for int8_rtn"),
        ("int4_rtn", {"block_size": 48}, "block_size must be a power of two from 16 to 256"),
        ("int4_rtn", {"accuracy_level": 7}, "unknown accuracy_level"),
        ("int8_static", {"calibration_tokens": 4}, "calibration_tokens must be at least 8"),
        ("int4_rtn", {"bogus": 1}, "unknown onnxruntime option(s): bogus"),
    ]
    for precision, options, message in cases:
        out = tmp_path / precision
        with pytest.raises(EdgeError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
            backend.quantize(fp32, out, precision, options)
        one_line(exc)
        assert nothing_left(out)
    quantized = dataclasses.replace(fp32, precision="int4_rtn")
    with pytest.raises(EdgeError, match="already quantized"):
        backend.quantize(quantized, tmp_path / "again", "int8_rtn")


@pytest.fixture(scope="module")
def narrow(backend: ONNXRuntimeBackend, demo_source: SourceModel,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[SourceModel, Artifact]:
    """A one-layer Llama 96 wide (as SmolLM2's 576, a multiple of 32 but not of 64) with an untied embedding,
    converted to fp32."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("narrow-llama")
    tokenizer = AutoTokenizer.from_pretrained(demo_source.path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    source = from_folder(folder)
    return source, backend.convert(source, tmp_path_factory.mktemp("narrow-onnx") / "fp32", "fp32")


def test_block_size_that_does_not_divide_a_layer(backend: ONNXRuntimeBackend, narrow: tuple[SourceModel, Artifact],
                                                 tmp_path: Path) -> None:
    _, base = narrow
    with pytest.raises(EdgeError, match="block_size 64 does not divide the 96 inputs of layer /model/layers.0/") as exc:
        backend.quantize(base, tmp_path / "out", "int4_rtn", {"block_size": 64})
    assert "block sizes dividing every layer: 16, 32" in one_line(exc)
    assert nothing_left(tmp_path / "out")
    int4 = backend.quantize(base, tmp_path / "b32", "int4_rtn", {"block_size": 32})
    assert int4.options["block_size"] == 32 and {attrs(n)["block_size"] for n in nodes(int4, "MatMulNBits")} == {32}
    # an untied embedding is block-quantized too: by the RTN pass itself, or after the int8 quantizers
    for artifact in (int4, backend.quantize(base, tmp_path / "dynamic", "int8_dynamic")):
        assert "Gather" not in {n.op_type for n in nodes(artifact, "Gather") if n.input[0].startswith("model.")}
        assert len(nodes(artifact, "GatherBlockQuantized")) == 1
    assert attrs(nodes(int4, "GatherBlockQuantized")[0])["bits"] == 4


def test_execution_provider_not_installed(backend: ONNXRuntimeBackend, fp32: Artifact, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert available_execution_providers()[0] == "cpu"
    missing = next(p for p in ("cuda", "dml") if p not in available_execution_providers())
    with pytest.raises(EdgeError, match=f"execution provider '{missing}' is not available here") as exc:
        backend.quantize(fp32, tmp_path / "out", "int4_rtn", {"execution_provider": missing})
    assert "(available: cpu" in one_line(exc)
    assert nothing_left(tmp_path / "out")
    with pytest.raises(EdgeError, match=f"'{missing}' is not available here"):
        backend.load(dataclasses.replace(fp32, options={"execution_provider": missing}), threads=1, context_tokens=16)
    monkeypatch.setenv("MLFLOW_EDGE_ONNXRUNTIME_EXECUTION_PROVIDER", missing)  # the environment wins at load time
    with pytest.raises(EdgeError, match=f"'{missing}' is not available here"):
        backend.load(fp32, threads=1, context_tokens=16)


def test_calibration_text_too_short_or_missing(backend: ONNXRuntimeBackend, fp32: Artifact, tiny_source: SourceModel,
                                               tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of calibration text.\n")
    short = TextSlice("short", text)
    for precision in ("int8_static", "int4_gptq"):
        with pytest.raises(EdgeError, match="calibration text short.* fewer than one window of 128") as exc:
            backend.quantize(fp32, tmp_path / precision, precision, calibration=short, source=tiny_source)
        one_line(exc)
        assert nothing_left(tmp_path / precision)
    with pytest.raises(EdgeError, match="int4_gptq reads calibration text; none was given"):
        backend.quantize(fp32, tmp_path / "none", "int4_gptq")
    assert nothing_left(tmp_path / "none")


def copy_of(artifact: Artifact, folder: Path) -> Artifact:
    shutil.copytree(artifact.path, folder)
    return dataclasses.replace(artifact, path=folder, files=tuple(folder / f.name for f in artifact.files))


@pytest.mark.parametrize("damage", ["corrupt graph", "truncated graph", "truncated data", "missing data",
                                    "bad genai_config"])
def test_damaged_model_folders_are_refused(backend: ONNXRuntimeBackend, fp32: Artifact, tiny_source: SourceModel,
                                          tmp_path: Path, damage: str) -> None:
    broken = copy_of(fp32, tmp_path / "broken")
    graph_file, data_file = broken.path / MODEL_FILE, broken.path / DATA
    if damage == "corrupt graph":
        graph_file.write_bytes(b"\x08\x07garbage" * 100)
    elif damage == "truncated graph":
        graph_file.write_bytes(graph_file.read_bytes()[: graph_file.stat().st_size // 2])
    elif damage == "truncated data":
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    elif damage == "missing data":
        data_file.unlink()
    else:
        (broken.path / "genai_config.json").write_text("{not json")
    expected = {"corrupt graph": "not a valid ONNX model", "truncated graph": "not a valid ONNX model",
                "truncated data": "truncated external data file", "missing data": "missing external data file",
                "bad genai_config": "not a valid genai_config.json"}[damage]
    for attempt in (lambda: backend.open_artifact(broken.path, tiny_source),
                    lambda: backend.load(broken, threads=1, context_tokens=16),
                    lambda: backend.quantize(broken, tmp_path / "out", "int4_rtn")):
        with pytest.raises(EdgeError, match=expected) as exc:
            attempt()
        one_line(exc)
    assert nothing_left(tmp_path / "out")


def test_open_artifact(backend: ONNXRuntimeBackend, fp32: Artifact, quantized: dict[str, Artifact],
                       tiny_source: SourceModel, tmp_path: Path) -> None:
    for artifact in (fp32, quantized["int4_rtn"], quantized["int8_dynamic"]):
        for path in (artifact.path, artifact.path / MODEL_FILE):  # the folder or its model file
            opened = backend.open_artifact(path, tiny_source)
            assert opened.precision == artifact.precision and opened.path == artifact.path
            assert opened.files == artifact.files
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(fp32.path / MODEL_FILE, bare / MODEL_FILE)  # an .onnx without a GenAI config: not this format
    assert backend.open_artifact(bare, tiny_source) is None
    assert backend.open_artifact(bare / MODEL_FILE, tiny_source) is None
    assert backend.open_artifact(fp32.path / "tokenizer.json", tiny_source) is None


# -- the runner ------------------------------------------------------------------------------------------------------
def test_runner(backend: ONNXRuntimeBackend, quantized: dict[str, Artifact], tokens: list[int]) -> None:
    runner = backend.load(quantized["int4_rtn"], threads=2, context_tokens=64)
    try:
        logits = runner.logits(tokens)
        assert logits.shape == (len(tokens), 49152) and logits.dtype == np.float32
        assert np.array_equal(runner.logits(tokens), logits)  # a fresh sequence every call
        runner.reset()
        prefix = np.array(runner.forward(tokens[:20]))
        step = np.array(runner.forward(tokens[20:21]))  # the KV cache carries the sequence on
        assert np.allclose(prefix, logits[:20], atol=1e-4) and np.allclose(step[0], logits[20], atol=1e-3)
        generation = runner.generate(tokens[:16], 8)
        assert (generation.prompt_tokens, generation.generated_tokens) == (16, 8)
        assert 0 < generation.ttft_s < generation.total_s and runner.prefill(tokens[:32]) > 0
        runner.reset()
        first = int(np.argmax(runner.forward(tokens[:16])[-1]))
        assert first == int(np.argmax(logits[15]))
        with pytest.raises(EdgeError, match="sequence of 65 tokens exceeds the context of 64") as exc:
            runner.generate((tokens * 2)[:60], 6)
        one_line(exc)
    finally:
        runner.close()
    with pytest.raises(EdgeError, match="runner is closed"):
        runner.logits(tokens)


def test_threads_and_context_are_honoured(fp32: Artifact) -> None:
    def started_threads(threads: int) -> tuple[ONNXRuntimeGenAIRunner, int]:
        before = len(os.listdir("/proc/self/task"))
        runner = ONNXRuntimeGenAIRunner(fp32.path, threads=threads, context_tokens=32)
        return runner, len(os.listdir("/proc/self/task")) - before

    one, one_started = started_threads(1)
    three, three_started = started_threads(3)
    try:
        assert one.session_options == {"intra_op_num_threads": 1}
        assert three_started >= one_started + 2  # ONNX Runtime's intra-op pool: threads - 1 workers
    finally:
        one.close()
        three.close()
    with pytest.raises(EdgeError, match="outside the model's context length of 1024") as exc:
        ONNXRuntimeGenAIRunner(fp32.path, threads=1, context_tokens=4096)
    one_line(exc)


# -- search space --------------------------------------------------------------------------------------------------
def test_starting_points_and_search_space(backend: ONNXRuntimeBackend) -> None:
    assert get_backend("onnxruntime").name == "onnxruntime"
    rtn, dynamic = backend.starting_points()
    assert backend.search_space(optuna.trial.FixedTrial(dict(rtn))) == (
        "int4_rtn", {"block_size": 32, "is_symmetric": True})  # the builder's int4 on a CPU (accuracy_level 4)
    assert backend.search_space(optuna.trial.FixedTrial(dict(dynamic))) == ("int8_dynamic", {"per_channel": False})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        precision, options = backend.search_space(trial)
        assert precision in QUANTIZE_PRECISIONS and options.get("block_size", 32) in (32, 64)  # divide 576 and 256
        assert "onnxruntime.execution_provider" not in trial.params  # only cpu here: never claimed
        study.tell(trial, 0.0)
    assert set(backend.sweep_types) <= set(QUANTIZE_PRECISIONS)
    assert backend.targets == {"cpu": "primary", "nvidia-gpu": "primary", "intel-cpu": "secondary"}


# -- Olive's own LLM paths, tracked ----------------------------------------------------------------------------------
@pytest.mark.xfail(strict=True, raises=ModuleNotFoundError,
                   reason="olive auto-opt --use_model_builder imports onnxruntime_genai.models.quantized_model, which "
                          "onnxruntime-genai 0.16+ dropped (see DEPENDENCIES.md)")
def test_olive_model_builder_path_has_its_module() -> None:
    import importlib

    importlib.import_module("onnxruntime_genai.models.quantized_model")


class KnownOliveFailure(Exception):
    """Olive's auto-opt failed the documented way; any other failure fails the test."""


KNOWN_FAILURES = {False: "'list' object has no attribute 'get_seq_length'",
                  True: "No module named 'onnxruntime_genai.models.quantized_model'"}


@pytest.mark.slow
@pytest.mark.parametrize("use_model_builder", [False, True])
@pytest.mark.xfail(strict=True, raises=KnownOliveFailure,
                   reason="olive auto-opt fails here: its torch exporter inside transformers 5.5, its "
                          "--use_model_builder path on a module onnxruntime-genai 0.16+ dropped (DEPENDENCIES.md); "
                          "when this passes, Olive's own path can replace the builder + passes of this backend")
def test_olive_auto_opt_int4(tiny_source: SourceModel, tmp_path: Path, use_model_builder: bool) -> None:
    cmd = [str(Path(sys.executable).parent / "olive"), "auto-opt", "-m", str(tiny_source.path), "-o",
           str(tmp_path / "out"), "--precision", "int4", "--device", "cpu", "--provider", "CPUExecutionProvider",
           "--log_level", "3", *(["--use_model_builder"] if use_model_builder else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900,
                          cwd=tmp_path)  # its cache (.olive-cache) goes there
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and KNOWN_FAILURES[use_model_builder] in log:
        raise KnownOliveFailure(KNOWN_FAILURES[use_model_builder])
    assert proc.returncode == 0, f"olive auto-opt fails in a new way: {log[-2000:]}"
    assert list((tmp_path / "out").rglob("*.onnx"))


# -- SmolLM2-135M --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_int4_is_smaller_than_int8_and_further_from_the_reference(demo_source: SourceModel,
                                                                         tmp_path: Path) -> None:
    from mlflow_edge.evaluation.harness import EvalSettings, Evaluator

    backend = ONNXRuntimeBackend()
    base = artifacts.convert(demo_source, "onnxruntime", "fp32")
    with pytest.raises(EdgeError, match="block_size 128 does not divide the 576 inputs") as exc:
        backend.quantize(base, tmp_path / "b128", "int4_rtn", {"block_size": 128})
    assert "block sizes dividing every layer: 16, 32, 64" in one_line(exc)
    assert nothing_left(tmp_path / "b128")
    int4 = artifacts.quantize(demo_source, base, "int4_rtn", {"block_size": 32, "accuracy_level": 4})
    int8 = artifacts.quantize(demo_source, base, "int8_rtn", {"accuracy_level": 4})
    settings = EvalSettings(window=128, windows=4, threads=2, repeats=2, prefill_tokens=64, prompt_tokens=16,
                            decode_tokens=8)
    evaluator = Evaluator(demo_source, settings, workdir=tmp_path / "eval")
    try:
        m4, m8 = evaluator.evaluate(int4), evaluator.evaluate(int8)
    finally:
        evaluator.close()
    assert m4["size_mb"] < 0.7 * m8["size_mb"] < 0.7 * base.size_bytes / 1e6
    assert m4["kld_mean"] > m8["kld_mean"] > 0
    assert m4["top1_agreement"] < m8["top1_agreement"] and m8["accuracy_retention"] > 0.97
