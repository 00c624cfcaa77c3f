"""ONNX Runtime backend: the ONNX Runtime GenAI model builder, Olive's ONNX quantization passes, the GenAI runtime.

- ``convert``: the ONNX Runtime GenAI model builder (what ``python -m onnxruntime_genai.models.builder -i <hf folder>
  -o <out> -p fp32 -e cpu`` runs, called in this process) writes ``model.onnx`` (+ external data
  ``model.onnx.data``), ``genai_config.json`` and the tokenizer files, at ``fp32`` (the builder's CPU graph, ``-e
  cpu``: the base) or ``fp16`` (its GPU precision, the ``-e cuda`` graph, which runs on the CPU too: its ``-e cpu``
  fp16 graph fails on the second decoding step in ONNX Runtime 1.32's CPU kernels); ``f32``/``f16`` are accepted
  too. Both graphs use ``GroupQueryAttention`` with the KV cache as inputs and outputs, a tied embedding as the LM
  head's weight (``Transpose`` → ``Gather``). Olive's own LLM export does not run here (``olive auto-opt``'s torch
  exporter fails inside transformers 5.5, its ``--use_model_builder`` path needs a module onnxruntime-genai 0.16+
  dropped); the tests keep checking that.
- ``quantize``: on that graph, each pass run on its own (Olive's ``Pass.run``; no engine, so no footprints):

  * weight-only ``MatMulNBits``, precision ``int<bits>_<algorithm>``: ``int4_rtn``/``int8_rtn`` (Olive's
    ``OnnxBlockWiseRtnQuantization``), ``int4_k_quant``/``int8_k_quant`` (``OnnxKQuantQuantization``), ``int4_hqq``
    and ``int4_gptq`` (calibration text) by ONNX Runtime's own HQQ and GPTQ quantizers: Olive 0.13's
    ``OnnxHqqQuantization`` writes blocks the runtime reads as other weights (a test keeps checking), its GPTQ is a
    PyTorch pass whose ONNX export is the path that fails here. k-quant and HQQ take about a minute for SmolLM2-135M
    on 2 cores, GPTQ longer. Options:
    ``block_size`` (a power of two from 16 dividing every quantized layer: 32 and 64 suit SmolLM2's 576-wide layers
    and the 256-wide test model, 128 does not divide 576), ``is_symmetric`` (RTN, GPTQ; k-quant and HQQ are
    asymmetric), ``accuracy_level`` (MatMulNBits' compute type of the activations: 0 unset, 1 fp32, 2 fp16, 3 bf16,
    4 int8, the default here as in the builder for CPUs: unset, Olive's default, decodes SmolLM2 ~15x slower here),
    ``last_matmul`` (the LM head, and a tied embedding with it, in ``int8`` or left ``float``: the builder's
    ``matmul_mixed_precision=last_matmul:int8``) and ``nodes_to_exclude`` (comma-separated node names left float);
  * ``int8_dynamic``: Olive's ``OnnxDynamicQuantization`` (``quantize_dynamic``: ``MatMulInteger``, activations
    quantized at run time), options ``per_channel``, ``reduce_range``, ``weight_type``;
  * ``int8_static``: Olive's ``OnnxStaticQuantization`` (``quantize_static``) calibrated on the calibration text,
    options ``calibrate_method`` (``MinMax``, ``Entropy``, ``Percentile``), ``quant_format`` (``QDQ``,
    ``QOperator``), ``activation_type``, ``weight_type``, ``per_channel``, ``reduce_range``. The GenAI graph takes it:
    its MatMuls are quantized, ``GroupQueryAttention`` and the KV cache stay float, calibration feeds fresh sequences.

  Both int8 methods quantize only MatMuls and need the fp32 base (their quantizers take float32 activations); the fp16
  base quantizes with RTN. A tied embedding shares the LM head's blocks where ``GatherBlockQuantized`` reads them
  (RTN, k-quant, GPTQ: as the builder's own int4 export ties them); otherwise (HQQ's float zero points, the int8
  methods' weights) and for an untied table, the embedding is block-quantized by Olive's RTN pass at the precision's
  bit width; with a float LM head it stays float. Data-aware methods read ``calibration_samples`` windows of
  ``calibration_tokens`` tokens of the calibration text (source tokenizer) and record ``calib.dataset`` and
  ``calib.sha256``. ``quantization.json`` in the artifact folder records the passes that ran (Olive's
  ``Pass.to_json``), the graph's metadata its precision.
- ``load``: an :class:`ONNXRuntimeGenAIRunner` on ``onnxruntime_genai`` (logits of every position from the model's
  ``logits`` output, greedy decoding that reuses the KV cache).

Runtime option, read at load time (the environment wins over the artifact's options): ``execution_provider`` /
``MLFLOW_EDGE_ONNXRUNTIME_EXECUTION_PROVIDER``: ``cpu`` (default), ``cuda`` or ``dml`` (the builder's ``-e`` names);
one that this ONNX Runtime GenAI build lacks is refused. ``threads`` sets the session's ``intra_op_num_threads``.
"""

from mlflow_edge.backends.onnxruntime.backend import ONNXRuntimeBackend
from mlflow_edge.backends.onnxruntime.folder import (
    MODEL_FILE,
    QUANTIZATION_RECORD,
    companion_files,
    genai_config,
    model_folder,
    read_graph,
)
from mlflow_edge.backends.onnxruntime.framework import (
    EXECUTION_PROVIDERS,
    available_execution_providers,
    require_genai,
    runtime_from_env,
)
from mlflow_edge.backends.onnxruntime.precision import QUANTIZE_PRECISIONS
from mlflow_edge.backends.onnxruntime.runtime import ONNXRuntimeGenAIRunner, genai_model

__all__ = [
    "EXECUTION_PROVIDERS",
    "MODEL_FILE",
    "QUANTIZATION_RECORD",
    "QUANTIZE_PRECISIONS",
    "ONNXRuntimeBackend",
    "ONNXRuntimeGenAIRunner",
    "available_execution_providers",
    "companion_files",
    "genai_config",
    "genai_model",
    "model_folder",
    "read_graph",
    "require_genai",
    "runtime_from_env",
]
