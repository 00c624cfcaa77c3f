"""OpenVINO + NNCF backend.

- ``convert``: optimum-intel's exporter (``optimum.exporters.openvino.main_export``, what ``optimum-cli export
  openvino`` runs) writes a stateful ``text-generation-with-past`` IR (``openvino_model.xml``/``.bin``, KV cache kept
  in the model's state) in ``f32``, ``f16`` or ``bf16`` (OpenVINO element types; optimum's ``fp32``/``fp16`` are
  accepted too), without weight compression, and the tokenizer beside it (HF files, plus the OpenVINO tokenizer
  models when ``openvino-tokenizers`` is installed).
- ``quantize``: NNCF on the IR.

  * weight compression (``nncf.compress_weights``), precision = a :class:`nncf.CompressWeightsMode` name
    (``INT8_SYM``, ``INT8_ASYM``, ``INT4_SYM``, ``INT4_ASYM``, ``INT3_SYM``, ``INT2_SYM``, ``NF4``, ``CB4``, ``MXFP4``,
    ``MXFP8_E4M3``, ``FP8_E4M3``, ``FP4``, ``NVFP4``), with NNCF's own options ``ratio``, ``group_size``,
    ``all_layers``, ``backup_mode``, ``sensitivity_metric``, ``awq``, ``scale_estimation``, ``gptq``,
    ``lora_correction``, ``subset_size`` and ``group_size_fallback_mode``;
  * ``INT8_PTQ``: full INT8 post-training quantization of weights and activations (``nncf.quantize``, transformer
    model type, options ``preset``, ``fast_bias_correction``, ``subset_size``). With ``max_drop`` set it runs
    ``nncf.quantize_with_accuracy_control`` instead: the metric is ``1 / perplexity`` on held-out calibration
    windows and the drop is relative by default (``drop_type``), so ``max_drop=0.05`` keeps the quantized IR's
    ``reference perplexity / perplexity`` at or above 0.95 on that text, the project's ``accuracy_retention`` gate
    (measured against the IR before quantization); NNCF reverts the most harmful quantizers until it holds.
  * ``MIXED`` with option ``recipe`` (a recipe file, :mod:`mlflow_edge.recipes`): every weight at its rule's type,
    the others at ``default_type``. Recipe patterns match the names of the IR's weight constants, which NNCF keeps
    through compression, as the PyTorch parameters they came from (``self.model.layers.0.mlp.down_proj.weight``,
    ``self.model.embed_tokens.weight``: one name per weight, so a tied embedding and output layer are one entry; the
    same in an f32, f16 or bf16 IR, :func:`.recipe.layer_name`); types are ``INT8_SYM``, ``INT8_ASYM``,
    ``INT4_SYM``, ``INT4_ASYM``, ``NF4`` and ``NONE`` (left uncompressed, at the IR's float type); the architecture is
    the ``model_type`` of the ``config.json`` beside the IR. The recipe is checked against the base before anything is
    written. It is applied through NNCF's public API: one ``compress_weights`` per mode, with every weight of another
    type in ``ignored_scope`` (NNCF matches weight constant names there; a weight compressed by an earlier call is no
    float weight any more and is left alone), 4-bit modes at ``ratio=1``, ``all_layers`` and ``group_size`` /
    ``group_size_fallback_mode`` (the only other options ``MIXED`` takes), 8-bit modes per output channel.
    NNCF then records only the last call's arguments in the IR's ``rt_info``.
  * Every weight-compression artifact whose weights end at more than one of those types (a 4-bit mode keeps
    ``ratio``'s remainder, and the embeddings unless ``all_layers``, in ``backup_mode`` by its ``sensitivity_metric``)
    and every ``MIXED`` one carries ``recipe.json`` beside ``openvino_model.xml``: the types read back from the
    compressed IR (element type of each weight constant, zero point or not), one exact rule per weight off the most
    common type, ``recipe_sha256`` in its options; not one of the artifact's files, and logged under the run's
    ``recipe/``, not in the model. Applied to the same base with the same group size options it gives the same
    ``openvino_model.bin``, byte for byte (an activation-based ``sensitivity_metric`` only ranks the layers). AWQ,
    scale estimation, GPTQ and LoRA correction change weights and scales beyond their types, so their artifacts carry
    no recipe (a recipe of their types would not reproduce them).

  Data-aware methods (AWQ, scale estimation, GPTQ, LoRA correction, an activation-based ``sensitivity_metric``,
  ``INT8_PTQ``) read the calibration text, tokenized with the source tokenizer into ``subset_size`` windows of
  ``calibration_tokens`` tokens, fed with the inputs of the stateful model (``input_ids``, ``attention_mask``,
  ``position_ids``, ``beam_idx``).
- ``load``: an :class:`OpenVINORunner` on the OpenVINO runtime (per-position logits of a fresh sequence, timed greedy
  generation that reuses the KV state).

Runtime options, read at load time (the environment wins over the artifact's options, which ``quantize`` records when
given; ``convert`` records none):

``device`` / ``MLFLOW_EDGE_OPENVINO_DEVICE``
    ``CPU`` (default), ``GPU``, ``NPU``, ``AUTO`` or an indexed device (``GPU.1``); a device that
    ``openvino.Core().available_devices`` lacks is refused.
``performance_hint`` / ``MLFLOW_EDGE_OPENVINO_PERFORMANCE_HINT``
    ``LATENCY`` (default) or ``THROUGHPUT``.
``inference_precision`` / ``MLFLOW_EDGE_OPENVINO_INFERENCE_PRECISION``
    ``INFERENCE_PRECISION_HINT`` (``f32``, ``f16``, ``bf16``); default: the device's own (``bf16`` on CPUs with
    native bf16, else ``f32``).

``threads`` sets ``INFERENCE_NUM_THREADS`` on CPU.
"""

from mlflow_edge.backends.openvino.backend import OpenVINOBackend
from mlflow_edge.backends.openvino.device import PERFORMANCE_HINTS, runtime_from_env
from mlflow_edge.backends.openvino.framework import compress_modes, require_openvino
from mlflow_edge.backends.openvino.ir import MODEL_BIN, MODEL_XML, companion_files, model_xml
from mlflow_edge.backends.openvino.precision import RECIPE_FILE
from mlflow_edge.backends.openvino.runtime import OpenVINORunner

__all__ = [
    "MODEL_BIN",
    "MODEL_XML",
    "PERFORMANCE_HINTS",
    "RECIPE_FILE",
    "OpenVINOBackend",
    "OpenVINORunner",
    "companion_files",
    "compress_modes",
    "model_xml",
    "require_openvino",
    "runtime_from_env",
]
