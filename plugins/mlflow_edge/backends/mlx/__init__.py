"""Apple MLX backend (``mlx`` + ``mlx-lm``): MLX safetensors folders, mlx-lm's conversion and quantizers.

- ``convert``: ``mlx_lm.convert`` (HF checkpoint → MLX folder: ``model.safetensors``, ``config.json`` and the source
  tokenizer) at a float dtype, ``float32``, ``float16`` or ``bfloat16`` (mlx-lm's ``MODEL_CONVERSION_DTYPES``;
  ``f32``/``fp32``, ``f16``/``fp16`` and ``bf16`` are accepted too). mlx-lm 0.31's model classes read the rotary base
  from the legacy key ``rope_theta`` while transformers 5 writes it only inside ``rope_parameters``; the conversion
  writes the legacy keys into ``config.json`` so the MLX model is the source model.
- ``quantize``: from a float conversion, through mlx-lm's own functions (``load`` → optional LoRA fuse → dtype cast →
  quantization → ``save``, what ``mlx_lm.convert -q``, ``mlx_lm.fuse``, ``mlx_lm.dynamic_quant`` and ``mlx_lm.awq``
  do). Precision names:

  * ``q<bits>_g<group>``: affine (``mlx_lm.convert -q --q-bits --q-group-size``), bits 2, 3, 4, 5, 6, 8 and group
    sizes 32, 64, 128 (those this mlx supports); ``q4_g64`` is mlx-lm's default.
  * ``mxfp4``, ``nvfp4``, ``mxfp8``: the microscaling modes (``--q-mode``; their bits and group size are fixed).
  * ``mixed_2_6``, ``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6``: mlx-lm's mixed recipes (``--quant-predicate``), low
    bits everywhere and high bits for ``v_proj``/``down_proj`` of some layers and ``lm_head``; option
    ``q_group_size``.
  * ``dynamic_<bpw>bpw`` (e.g. ``dynamic_4.5bpw``): ``mlx_lm.dynamic_quant``. Layer sensitivities (the gradient of the
    KL divergence to the float model on calibration text), then mlx-lm's threshold for the target bits per weight
    as mlx-lm computes it (``compute_bits_per_weight``, scales included), raised where mlx-lm's search overshoots so
    the target is a ceiling: layers more sensitive than the threshold get ``high_bits``, the rest ``low_bits``.
    Options ``low_bits``/``low_group_size``/``high_bits``/``high_group_size`` (mlx-lm's defaults 4/64/5/64),
    ``num_samples``, ``sequence_length``. A target outside what those bits reach is refused.
  * ``awq_q<bits>_g<group>``: ``mlx_lm.awq`` (activation-aware scaling and clipping per block on calibration text;
    embeddings at ``embed_bits``/``embed_group_size``), for the model types mlx-lm has an AWQ config for; options
    ``n_grid``, ``num_samples``, ``sequence_length``. CPU cost grows with layers × ``n_grid``: minutes for small models.
  * ``mixed`` with option ``recipe`` (a recipe file, :mod:`mlflow_edge.recipes`): every layer at its rule's type,
    the others at ``default_type``. Layers are the module paths mlx-lm's quantization predicate sees
    (``model.layers.0.self_attn.q_proj``, ``model.embed_tokens``, ``lm_head``); types are the uniform precisions
    above (``q4_g64``, ``mxfp4`` …) and the quantization's ``dtype`` (``float32`` …) for a layer left unquantized;
    the architecture is ``config.json``'s ``model_type``. The recipe is checked against the base before anything is
    written. Every ``mixed_*``, ``dynamic_*`` and ``mixed`` artifact carries ``recipe.json``: its per-layer types as
    mlx-lm reads them back, one exact rule per layer off the most common type (``recipe_sha256`` in its options);
    applying that file to the same base with the same ``dtype`` and adapter gives the same weight files, byte for byte.

  Data-aware methods read ``num_samples`` consecutive windows of ``sequence_length`` tokens of the calibration text
  (tokenized with the source tokenizer) and record ``calib.dataset``/``calib.sha256``. Every quantization takes
  ``dtype`` (the float type of the unquantized parameters and of the scales; default: the base's) and
  ``adapter_path`` (an mlx-lm LoRA/DoRA adapter folder: ``adapters.safetensors`` + ``adapter_config.json``) with
  ``fuse_adapter`` (fuse it before quantizing, as ``mlx_lm.fuse`` does; otherwise it travels in the artifact's
  ``adapters/`` folder and is applied at load). An adapter whose weights do not match the model is refused.
  Group sizes must divide every quantized layer (mlx-lm would leave such layers silently unquantized).
- ``load``: an :class:`MLXRunner` (per-position logits, mlx-lm's ``generate_step`` with its KV cache
  ``make_prompt_cache``).

On this kind of Linux CPU (the ``mlx[cpu]`` wheel) MLX runs each stream on one thread and has no thread setting, so
``threads`` is accepted and not applied; its quantized kernels are fast with ``float32`` scales and far slower with
``float16``/``bfloat16`` ones, hence ``base_precision = "float32"`` (4-bit, group 64 is then 5.0 bits per weight; on
Apple silicon quantize a ``float16`` conversion, or pass ``dtype=float16``, for mlx-lm's 4.5).
"""

from mlflow_edge.backends.mlx.adapters import check_adapter
from mlflow_edge.backends.mlx.backend import MLXBackend
from mlflow_edge.backends.mlx.folder import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, check_folder, model_files
from mlflow_edge.backends.mlx.framework import require_mlx_lm
from mlflow_edge.backends.mlx.recipe import RECIPE_FILE, check_recipe, read_recipe
from mlflow_edge.backends.mlx.runtime import MLXRunner, load_mlx_model

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_DIR",
    "ADAPTER_WEIGHTS",
    "RECIPE_FILE",
    "MLXBackend",
    "MLXRunner",
    "check_adapter",
    "check_folder",
    "check_recipe",
    "load_mlx_model",
    "model_files",
    "read_recipe",
    "require_mlx_lm",
]
