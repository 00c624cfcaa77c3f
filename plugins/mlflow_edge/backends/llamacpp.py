"""llama.cpp / GGUF backend (llama-cpp-python).

- ``convert``: llama.cpp's own ``convert_hf_to_gguf.py`` (shipped in the llama-cpp-python sdist, fetched once into the
  cache) writes ``f32``/``f16``/``bf16``/``q8_0`` GGUF.
- ``quantize``: ``llama_model_quantize`` with every type it offers (``Q2_K`` … ``Q8_0``, ``IQ*``, ``TQ*``), and the
  options of ``llama-quantize``: ``allow_requantize``, ``pure``, ``output_tensor_type``, ``token_embedding_type``,
  ``leave_output_tensor``, and an importance matrix (``imatrix``) computed from calibration text.
- per-tensor mixed precision: a recipe (:mod:`mlflow_edge.recipes`, ``recipe=<file>``) becomes llama.cpp's tensor
  type overrides (``llama-quantize --tensor-type``); ``target_bpw`` / ``target_size_mb`` measure each tensor's error at
  each of ``recipe_types`` once per base (cached), allocate the types within the budget and apply that recipe.
- ``load``: a :class:`LlamaCppRunner` on the llama.cpp C API (per-position logits, timed greedy generation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from mlflow_edge import cache, procs, recipes
from mlflow_edge.backends.base import (
    Artifact,
    Bits,
    Generation,
    OptionSpec,
    StageNeed,
    option_bool,
    typed_options,
)
from mlflow_edge.errors import EdgeError

CONVERT_PRECISIONS = ("f32", "f16", "bf16", "q8_0")
# llama-quantize refuses these without an importance matrix
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"})
_GGUF_NAME = "model.gguf"
RECIPE_FILE = "recipe.json"
MIXED = "MIXED"
"""The precision whose types a recipe decides (its ``default_type`` becomes the file type)."""
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0",
                "TQ2_0", "MXFP4")
"""ggml tensor types a recipe rule may name (llama.cpp quantizes to them; gguf-py reads them back)."""
TENSOR_TYPES_NEED_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
DEFAULT_RECIPE_TYPES = "Q3_K,IQ4_XS,IQ4_NL,Q4_K,Q5_K,Q6_K,Q8_0"
"""Candidate types of a budgeted allocation, 3.4 to 8.5 bits per weight: the k-quants and IQ4 types of llama.cpp's
own mixtures, and Q8_0. IQ4_NL rather than Q4_0: the same size, a lower error on every SmolLM2 tensor measured, and
about the same CPU decode speed (both repacked for AVX2). Q4_1, Q5_0 and Q5_1 are left out: on this x86 CPU they
decode at half Q4_0's speed; llama.cpp still falls back to Q5_0/Q5_1 (and Q8_0) for k-quants on rows whose width is no
multiple of 256 (SmolLM2's 576), and the table records the type it really wrote."""
SEARCH_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S",
                "Q5_K_M", "Q6_K", "Q8_0")
"""The uniform types (llama.cpp's own mixtures) the search samples."""
SEARCH_BUDGETS_BPW = (4.5, 5.0, 5.5, 6.0, 6.5)
"""Bits per weight (of the quantized tensors) the search samples for a :data:`MIXED` recipe: from Q4_0's size to
between Q6_K and Q8_0, where the gates of a real evaluation usually fall."""
MIXED_START_BPW = 6.0
TYPE_BPW: dict[str, tuple[float, str | None]] = {
    "Q2_K": (2.96, "Q2_K"), "Q3_K_S": (3.50, "Q3_K"), "Q3_K_M": (3.91, "Q3_K"), "Q3_K_L": (4.27, "Q3_K"),
    "Q4_0": (4.50, None), "Q4_1": (5.00, None), "Q4_K_S": (4.58, "Q4_K"), "Q4_K_M": (4.84, "Q4_K"),
    "Q5_0": (5.50, None), "Q5_1": (6.00, None), "Q5_K_S": (5.52, "Q5_K"), "Q5_K_M": (5.68, "Q5_K"),
    "Q6_K": (6.56, "Q6_K"), "Q8_0": (8.50, None),
}
"""Bits per weight of the uniform types: the block types' own, the mixtures' averages on a 7B Llama (llama.cpp's
quantize tables), and the k-quant each mixture is made of (``None``: a legacy type that never falls back)."""
K_FALLBACK_BPW = {"Q2_K": 4.5, "Q3_K": 4.5, "Q4_K": 5.5, "Q5_K": 6.0, "Q6_K": 8.5}
"""Bits per weight llama.cpp falls back to for a k-quant on rows that are no multiple of its 256-wide blocks
(IQ4_NL, Q5_0, Q5_1, Q8_0)."""
K_BLOCK = 256
TABLE_TYPE = {"Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
              "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0"}
"""The sensitivity table's type a uniform type is estimated by (its mixtures' main k-quant)."""
FALLBACK_TYPE = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
                 "Q6_K": "Q8_0"}
"""The type llama.cpp writes instead of a k-quant on a row that is no multiple of 256 (the table holds its row)."""

"""The budget of the mixed recipe a new study tries first: between Q5_K_M and Q6_K on models whose rows are multiples
of 256, and just under Q4_K_M on SmolLM2 (6.16 bits per quantized weight there: its 576-wide rows make the k-quants
fall back to Q5_0 / Q5_1)."""
_NOT_WITH_TARGET = ("output_tensor_type", "token_embedding_type", "leave_output_tensor")
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
"""sha256 of the llama-cpp-python sdists whose convert_hf_to_gguf.py runs here (pip fetches them hash-pinned)."""


def require_llama_cpp():
    """The ``llama_cpp`` module, or a one-line error naming the extra to install."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EdgeError("llama-cpp-python is not installed: pip install 'mlflow-edge[llamacpp]'") from exc
    return llama_cpp


def quant_types() -> dict[str, int]:
    """Every ``llama_ftype`` this llama.cpp build offers, by its llama-quantize name."""
    llama_cpp = require_llama_cpp()
    types = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(llama_cpp, attr))
    return types


def file_type_name(path: Path) -> str:
    """The quantization type a GGUF file records (``general.file_type``, e.g. ``Q4_K_M``), else its name's suffix."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field("general.file_type")
    names = {number: name for name, number in quant_types().items()}
    if field is not None and int(field.contents()) in names:
        return names[int(field.contents())]
    return path.stem.split(".")[-1]


def ggml_type_id(name: str) -> int:
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        raise EdgeError(f"unknown ggml tensor type: {name}") from None


class LlamaCppBackend:
    """GGUF artifacts through llama.cpp."""

    name: ClassVar[str] = "llamacpp"
    format: ClassVar[str] = "gguf"
    flavor: ClassVar[str] = "mlflow_edge.flavors.gguf"
    requirements: ClassVar[tuple[str, ...]] = ("llama-cpp-python",)
    targets: ClassVar[Mapping[str, str]] = {
        "cpu": "primary", "arm-cpu": "primary", "arm-mobile": "primary",
        "nvidia-gpu": "secondary", "apple-silicon": "secondary",  # llama.cpp built with CUDA / Metal
    }
    base_precision: ClassVar[str] = "f16"
    sweep_types: ClassVar[tuple[str, ...]] = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
    # llama.cpp's own server binary, and llama-cpp-python's (its [server] extra): both OpenAI-compatible
    native_serve_commands: ClassVar[tuple[str, ...]] = (
        "llama-server -m {model} --host 127.0.0.1 --port {port}",
        "python -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port}",
    )

    def convert_precisions(self) -> Sequence[str]:
        return CONVERT_PRECISIONS

    def quantize_precisions(self) -> Sequence[str]:
        return (*quant_types(), MIXED)

    def option_specs(self) -> Sequence[OptionSpec]:
        return (
            OptionSpec("imatrix", bool, False, help="compute an importance matrix from calibration text"),
            OptionSpec("imatrix_chunks", int, 16, label="",
                       help="calibration chunks of 512 tokens for the importance matrix"),
            OptionSpec("allow_requantize", bool, False, help="allow re-quantizing tensors that are already quantized"),
            OptionSpec("pure", bool, False, help="quantize every tensor to the default type (no k-quant mixtures)"),
            OptionSpec("leave_output_tensor", bool, False, help="keep output.weight unquantized"),
            OptionSpec("output_tensor_type", str, None, help="ggml type for output.weight (e.g. Q8_0)"),
            OptionSpec("token_embedding_type", str, None, help="ggml type for token_embd.weight (e.g. Q8_0)"),
            OptionSpec("nthread", int, 0, help="quantization threads (0: all cores)"),
            OptionSpec("recipe", str, None, help="a recipe JSON file (tensor pattern -> type, see "
                       "mlflow_edge.recipes) to apply; with precision MIXED its default_type is the file type"),
            OptionSpec("target_bpw", float, None, help="per-tensor types chosen from recipe_types by measured "
                       "sensitivity, within this many bits per weight of the quantized tensors"),
            OptionSpec("target_size_mb", float, None, help="like target_bpw, within a model file of this many MB"),
            OptionSpec("recipe_types", str, DEFAULT_RECIPE_TYPES, help="comma-separated candidate ggml types of "
                       "target_bpw / target_size_mb"),
        )

    def versions(self) -> Mapping[str, str]:
        return {"llama_cpp_python": require_llama_cpp().__version__}

    def unsupported_reason(self, source: Any) -> str | None:
        known = supported_architectures()
        if source.architecture in known:
            return None
        return (f"llama.cpp's convert_hf_to_gguf.py ({len(known)} architectures) cannot convert "
                f"{source.architecture}")

    def open_artifact(self, path: Path, source: Any) -> Artifact | None:
        if not (path.is_file() and path.suffix.lower() == ".gguf"):
            return None
        from mlflow_edge.sources import validate_gguf

        validate_gguf(path)
        return Artifact(path=path, backend=self.name, format=self.format, precision=file_type_name(path),
                        source_name=source.name, source_sha256=source.sha256, num_parameters=source.num_parameters,
                        files=(path,))

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        return ({"llamacpp.precision": "Q4_K_M", "llamacpp.imatrix": False},  # llama.cpp's recommended default
                {"llamacpp.precision": MIXED, "llamacpp.target_bpw": MIXED_START_BPW, "llamacpp.imatrix": False})

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        precision = trial.suggest_categorical("llamacpp.precision", [*SEARCH_TYPES, MIXED])
        options: dict[str, Any] = {}
        if precision == MIXED:  # a per-tensor recipe allocated within a sampled budget
            options["target_bpw"] = trial.suggest_categorical("llamacpp.target_bpw", list(SEARCH_BUDGETS_BPW))
        options["imatrix"] = trial.suggest_categorical("llamacpp.imatrix", [False, True])
        if options["imatrix"]:
            options["imatrix_chunks"] = 8
        return precision, options

    def precision_bits(self, precision: str, options: Mapping[str, Any], source: Any) -> Bits | None:
        imatrix = "+imatrix" if option_bool(options.get("imatrix", False)) else ""
        if precision == MIXED:
            target = options.get("target_bpw")
            return Bits("mixed" + imatrix, float(target)) if target is not None else None
        if precision not in TYPE_BPW:
            return None
        bpw, k_type = TYPE_BPW[precision]
        if k_type is not None:  # rows no multiple of 256 (SmolLM2's 576) fall back to a legacy type
            from mlflow_edge.sources import matrix_widths

            widths = matrix_widths(source)
            narrow = sum(n for width, n in widths.items() if width % K_BLOCK) / max(sum(widths.values()), 1)
            bpw = (1 - narrow) * bpw + narrow * max(K_FALLBACK_BPW[k_type], bpw)
        return Bits("type" + imatrix, round(bpw, 3))

    def resource_needs(self, facts: Any) -> Sequence[StageNeed]:
        # convert_hf_to_gguf.py reads the checkpoint lazily (a few tensors at a time, in fp32) and writes f16;
        # llama_model_quantize maps the f16 file and writes the quantized one. (A budgeted recipe's sensitivity pass,
        # which holds the source in fp32 for its Fisher factors, is not planned: it runs only for MIXED trials.)
        runtime, tensor = 1 << 29, 4 * facts.largest_tensor
        f16 = facts.bytes_at("float16")
        return (StageNeed("llamacpp conversion (f16)", runtime + 3 * tensor, f16,
                          "leave llamacpp out (--backends)"),
                StageNeed("llamacpp quantization", runtime + f16 + 2 * tensor, facts.parameters * 6 // 8,
                          "leave llamacpp out (--backends)"))

    def estimated_kld(self, base: Artifact, precision: str, options: Mapping[str, Any], calibration: Any,
                      source: Any) -> float | None:
        """The mean KLD the per-tensor sensitivity predicts for a configuration — half its summed Fisher-weighted
        error (:func:`tensor_errors`), a uniform type estimated by its main k-quant on every tensor — when the table
        is already measured for ``base`` (a budgeted recipe measured it); ``None`` otherwise."""
        options = typed_options(self.name, self.option_specs(), options)
        table = measured_sensitivity(base, options, calibration, source)
        if table is None:
            return None
        if precision == MIXED and options.get("target_bpw") is not None:
            budget = recipes.budget_bits(table, target_bpw=options["target_bpw"])
            return recipes.predict(table, recipes.allocate(table, budget))["error"] / 2
        error = _uniform_error(table, TABLE_TYPE[precision]) if precision in TABLE_TYPE else None
        return None if error is None else error / 2

    # -- convert -------------------------------------------------------------------------------------------------
    def convert(self, source: Any, out_dir: Path, precision: str) -> Artifact:
        precision = precision.lower()
        if precision not in CONVERT_PRECISIONS:
            raise EdgeError(f"unknown GGUF conversion type '{precision}' (choose from {', '.join(CONVERT_PRECISIONS)})")
        _refuse_remote_code(source)
        out_dir.mkdir(parents=True, exist_ok=True)
        script = converter_dir() / "convert_hf_to_gguf.py"
        partial = out_dir / (_GGUF_NAME + ".partial")
        cmd = [sys.executable, str(script), str(source.path), "--outfile", str(partial), "--outtype", precision]
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the sdist's own gguf-py
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the converter reads the local folder only
        proc = procs.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            raise EdgeError(f"convert_hf_to_gguf.py failed for {source.name}: {procs.last_error_line(proc.stderr)}")
        final = partial.rename(out_dir / _GGUF_NAME)
        return Artifact(
            path=final,
            backend=self.name,
            format=self.format,
            precision=precision.upper() if precision != "q8_0" else "Q8_0",
            source_name=source.name,
            source_sha256=source.sha256,
            num_parameters=source.num_parameters,
            options={"outtype": precision},
            files=(final,),
        )

    # -- quantize ------------------------------------------------------------------------------------------------
    def quantize(
        self,
        base: Artifact,
        out_dir: Path,
        precision: str,
        options: Mapping[str, Any] | None = None,
        calibration: Any = None,
        source: Any = None,
    ) -> Artifact:
        options = typed_options(self.name, self.option_specs(), options)
        qtype = precision.upper()
        mode = _recipe_mode(options, qtype)
        _check_quantize(base, qtype, options)
        recipe = self._checked_recipe(base, qtype, options) if mode == "recipe" else None
        if recipe is not None:  # its recorded settings (the importance matrix) where the options leave them unset
            options = typed_options(self.name, self.option_specs(), recipes.with_settings(options, recipe))
        candidates = _candidate_types(options) if mode == "target" else ()
        recorded = {k: v for k, v in options.items() if v not in (None, "", False, 0) or k == "imatrix"}
        imatrix = _imatrix(base, options, calibration, source, recorded)
        table = None
        if mode == "target":  # measured and allocated before anything is written
            table = sensitivity_table(base, candidates, options, imatrix, calibration, source)
            recipe = self._allocated_recipe(base, qtype, options, table, candidates, imatrix, calibration, source)
            recorded.update(recipe_types=",".join(candidates), predicted_bpw=recipe.predicted["bpw"])
            if recipe.sensitivity["error"] == "fisher":  # data-aware: the calibration text is provenance
                recorded.update({"calib.dataset": calibration.label, "calib.sha256": calibration.sha256})
        out_dir.mkdir(parents=True, exist_ok=True)
        if imatrix is not None:
            imatrix = _Imatrix(Path(shutil.copyfile(imatrix.path, out_dir / "imatrix.gguf")), imatrix.key)
        default_type = recipe.default_type if qtype == MIXED else qtype
        final = _run_quantize(base, out_dir / _GGUF_NAME, default_type, options, imatrix,
                              recipe.rules if recipe else ())
        if recipe is not None:  # beside the model, not one of its files (its size and content hash are the GGUF's)
            recipe.save(out_dir / RECIPE_FILE)
            recorded["recipe_sha256"] = recipe.digest()
        if table is not None:
            table.to_csv(out_dir / "sensitivity.csv", index=False)
            recipes.plot_sensitivity(table, out_dir / "sensitivity.png",
                                     title=f"{base.source_name}: predicted error per tensor and type")
        return Artifact(
            path=final,
            backend=self.name,
            format=self.format,
            precision=qtype,
            source_name=base.source_name,
            source_sha256=base.source_sha256,
            num_parameters=base.num_parameters,
            options={**recorded, "base_precision": base.precision},
            files=(final,),
        )

    def _checked_recipe(self, base: Artifact, qtype: str, options: Mapping[str, Any]) -> recipes.Recipe:
        """The ``recipe`` file, validated against the base GGUF and the options before anything is written."""
        recipe = recipes.load_recipe(options["recipe"])
        architecture, names = quantizable_tensors(base.path, not option_bool(options.get("leave_output_tensor", 0)))
        quantized_types = [t for t in quant_types() if t not in _UNQUANTIZED]
        recipes.validate_against(recipe, names, architecture, TENSOR_TYPES, self.name, default_types=quantized_types)
        used = {rule.type for rule in recipe.rules} | {recipe.default_type if qtype == MIXED else qtype}
        if needs := sorted(used & (TENSOR_TYPES_NEED_IMATRIX | IMATRIX_REQUIRED)):
            if not option_bool(recipes.with_settings(options, recipe).get("imatrix", False)):
                raise EdgeError(f"the recipe's type {needs[0]} needs an importance matrix: set llamacpp.imatrix=true")
        return recipe

    def _allocated_recipe(self, base: Artifact, qtype: str, options: Mapping[str, Any], table: Any,
                          candidates: Sequence[str], imatrix: "_Imatrix | None", calibration: Any,
                          source: Any) -> recipes.Recipe:
        """The recipe minimizing the table's predicted error within ``target_bpw`` or ``target_size_mb``."""
        targets = {k: options[k] for k in ("target_bpw", "target_size_mb") if options.get(k) is not None}
        fixed = _fixed_bits(base.path, table) if "target_size_mb" in targets else 0
        budget = recipes.budget_bits(table, **targets, fixed_bits=fixed)
        allocation = recipes.allocate(table, budget)
        predicted = {k: float(f"{v:.6g}") for k, v in recipes.predict(table, allocation).items()}
        architecture = quantizable_tensors(base.path)[0]
        measured = {"types": list(candidates), "imatrix": imatrix is not None,
                    "error": "fisher" if calibration is not None and source is not None else "squared",
                    **({"calib.sha256": calibration.sha256, "chunks": int(options.get("imatrix_chunks") or 16)}
                       if calibration is not None and source is not None else {})}
        settings = {"imatrix": imatrix is not None,  # the types were measured, and are applied, with it
                    **({"imatrix_chunks": int(options.get("imatrix_chunks") or 16)} if imatrix is not None else {})}
        return recipes.recipe_from_allocation(
            allocation, backend=self.name, architecture=architecture,
            default_type=qtype if qtype != MIXED else _default_type(allocation, table),
            source_sha256=base.source_sha256, budget=targets, predicted=predicted, sensitivity=measured,
            settings=settings)

    # -- load ----------------------------------------------------------------------------------------------------
    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> "LlamaCppRunner":
        return LlamaCppRunner(artifact.path, threads=threads, context_tokens=context_tokens)


def _full_disk(folder: Path) -> str:
    """`` (no space left …)`` when the file system of ``folder`` has under 1 MiB free, else ``""``."""
    stat = os.statvfs(folder)
    if stat.f_bavail * stat.f_frsize >= 1 << 20:
        return ""
    return f" (no space left on the device of {folder.parent}; free some, or set MLFLOW_EDGE_CACHE to a larger one)"


def _refuse_remote_code(source: Any) -> None:
    """convert_hf_to_gguf.py loads some tokenizers with ``trust_remote_code=True``: never start it on a folder that
    could make that run code."""
    from mlflow_edge.sources import remote_code_reason

    reason = remote_code_reason(Path(source.path))
    if reason:
        raise EdgeError(f"convert_hf_to_gguf.py is not run on {source.name}: it could execute the model's own code "
                        f"({reason})")


def _tensor_type(options: Mapping[str, Any], key: str) -> int | None:
    return ggml_type_id(options[key]) if options.get(key) else None


_UNQUANTIZED = frozenset({"F32", "F16", "BF16"})


def _is_quantized(artifact: Artifact) -> bool:
    return artifact.precision.upper() not in _UNQUANTIZED


def _check_quantize(base: Artifact, qtype: str, options: Mapping[str, Any]) -> None:
    """Refuse, before anything is written, what llama.cpp would refuse or silently ignore."""
    types = quant_types()
    if qtype != MIXED and qtype not in types:
        raise EdgeError(f"unknown GGUF quantization type '{qtype}' (choose from {', '.join(types)}, or {MIXED} "
                        "with a recipe)")
    if qtype in IMATRIX_REQUIRED and not option_bool(options.get("imatrix", False)):
        raise EdgeError(f"{qtype} needs an importance matrix: set llamacpp.imatrix=true "
                        "(computed from calibration text)")
    for key in ("output_tensor_type", "token_embedding_type"):
        if options.get(key):
            ggml_type_id(options[key])  # validate early
    if _is_quantized(base) and not option_bool(options.get("allow_requantize", False)):
        raise EdgeError(f"{base.path.name} is already quantized ({base.precision}); "
                        "set llamacpp.allow_requantize=true")


def _recipe_mode(options: Mapping[str, Any], qtype: str) -> str | None:
    """``"recipe"`` (a recipe file), ``"target"`` (a budget to allocate) or ``None``; one of them at most."""
    given = [k for k in ("recipe", "target_bpw", "target_size_mb") if options.get(k) is not None]
    if len(given) > 1:
        raise EdgeError(f"give one of llamacpp.recipe, target_bpw and target_size_mb, not {' and '.join(given)}")
    if not given:
        if qtype == MIXED:
            raise EdgeError(f"precision {MIXED} needs llamacpp.recipe=<file>, target_bpw=<bits> or "
                            "target_size_mb=<MB>")
        if options.get("recipe_types") is not None:
            raise EdgeError("llamacpp.recipe_types needs target_bpw or target_size_mb")
        return None
    if qtype in _UNQUANTIZED:
        raise EdgeError(f"{qtype} is not a quantized type: llama.cpp applies per-tensor types only under one "
                        f"(use {MIXED} or e.g. Q8_0)")
    key = given[0]
    if key != "recipe" and not (math.isfinite(options[key]) and options[key] > 0):
        raise EdgeError(f"llamacpp.{key} must be a positive number, got {options[key]}")
    if key == "recipe":
        if options.get("recipe_types") is not None:
            raise EdgeError("llamacpp.recipe_types needs target_bpw or target_size_mb, not a recipe file")
        return "recipe"
    if fixed := [k for k in _NOT_WITH_TARGET if options.get(k)]:
        raise EdgeError(f"llamacpp.{fixed[0]} cannot be combined with {key}: the allocation chooses every "
                        "tensor's type (edit its recipe.json and apply that instead)")
    return "target"


def _candidate_types(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``recipe_types`` of an allocation, checked: known ggml types, importance matrix where one is needed."""
    text = options.get("recipe_types") or DEFAULT_RECIPE_TYPES
    types = tuple(dict.fromkeys(t.strip().upper() for t in str(text).split(",") if t.strip()))
    if not types:
        raise EdgeError("llamacpp.recipe_types names no type")
    if unknown := [t for t in types if t not in TENSOR_TYPES]:
        raise EdgeError(f"unknown ggml tensor type in llamacpp.recipe_types: {unknown[0]} "
                        f"(choose from {', '.join(TENSOR_TYPES)})")
    needs = [t for t in types if t in TENSOR_TYPES_NEED_IMATRIX]
    if needs and not option_bool(options.get("imatrix", False)):
        raise EdgeError(f"recipe type {needs[0]} needs an importance matrix: set llamacpp.imatrix=true")
    return types


@dataclasses.dataclass(frozen=True)
class _Imatrix:
    """The importance matrix file a quantization reads, and its cache key."""

    path: Path
    key: Mapping[str, Any]


def _imatrix(base: Artifact, options: Mapping[str, Any], calibration: Any, source: Any,
             recorded: dict[str, Any]) -> _Imatrix | None:
    """The cached importance matrix of ``source`` on ``calibration`` when ``imatrix`` is on (its provenance added to
    ``recorded``), else ``None``."""
    use = option_bool(options.get("imatrix", False))
    recorded["imatrix"] = use
    if not use:
        return None
    if calibration is None or source is None:
        raise EdgeError("an importance matrix needs calibration text and the source model")
    chunks = int(options.get("imatrix_chunks") or 16)
    key = _imatrix_key(base, options, calibration, source)
    cached = cache.get_or_build(
        "imatrix", key, lambda tmp: compute_imatrix(source, base, calibration, tmp / "imatrix.gguf", chunks)
    )
    recorded.update({"imatrix_chunks": chunks, "calib.dataset": calibration.label, "calib.sha256": calibration.sha256})
    return _Imatrix(cached / "imatrix.gguf", key)


def _run_quantize(base: Artifact, output: Path, default_type: str, options: Mapping[str, Any],
                  imatrix: _Imatrix | None, rules: Sequence[recipes.Rule] = (), pure: bool | None = None) -> Path:
    """``llama_model_quantize`` in a child process: ``base`` to ``output`` with file type ``default_type`` and the
    ``rules`` as tensor type overrides; the file appears only when it is complete."""
    partial = output.with_name(output.name + ".partial")
    spec = {
        "input": str(base.path),
        "output": str(partial),
        "ftype": quant_types()[default_type],
        "nthread": int(options.get("nthread") or 0),
        "allow_requantize": option_bool(options.get("allow_requantize", False)),
        "pure": option_bool(options.get("pure", False)) if pure is None else pure,
        "quantize_output_tensor": not option_bool(options.get("leave_output_tensor", False)),
        "output_tensor_type": _tensor_type(options, "output_tensor_type"),
        "token_embedding_type": _tensor_type(options, "token_embedding_type"),
        "imatrix": str(imatrix.path) if imatrix else None,
        "tensor_types": [[rule.pattern, ggml_type_id(rule.type)] for rule in rules],
    }
    proc = procs.run([sys.executable, "-m", "mlflow_edge.backends.llamacpp"], input=json.dumps(spec),
                     capture_output=True, text=True)
    if proc.returncode != 0 or not partial.is_file():
        full = _full_disk(output.parent)  # before the partial file goes: llama.cpp only says that it failed
        partial.unlink(missing_ok=True)
        what = default_type if not rules else f"{default_type} with {len(rules)} tensor type rule(s)"
        raise EdgeError(f"llama.cpp could not quantize to {what}: {procs.last_error_line(proc.stderr)}{full}")
    return partial.rename(output)


# -- per-tensor sensitivity ------------------------------------------------------------------------------------------
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid", "altup", "laurel",
                    "per_layer_model_proj", "position_embd", "token_types", "ssm_conv1d", "shortconv.conv.weight",
                    "indexer.k_proj.weight", "indexer.q_proj.weight")
"""Name parts of tensors llama.cpp never quantizes (``tensor_allows_quantization`` in src/llama-quant.cpp)."""


def quantizable_tensors(path: Path, quantize_output: bool = True) -> tuple[str, list[str]]:
    """``general.architecture`` of the GGUF at ``path`` and the names of the tensors llama.cpp quantizes, in file
    order (2-D or 3-D weights but norms, routers and the few it keeps as they are)."""
    architecture, _, tensors = gguf_layout(path)
    names = [name for name, n_dims, _ in tensors
             if n_dims >= 2 and name.endswith("weight") and not any(p in name for p in _NEVER_QUANTIZED)
             and (quantize_output or name != "output.weight")]
    return architecture, names


def gguf_layout(path: Path) -> tuple[str, int, tuple[tuple[str, int, int], ...]]:
    """Architecture, block count and (name, dimensions, bytes) of every tensor of the GGUF file at ``path``, read
    once per file version."""
    stat = Path(path).stat()
    return _gguf_layout(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_layout(path: str, _size: int, _mtime_ns: int) -> tuple[str, int, tuple[tuple[str, int, int], ...]]:
    """Architecture, block count and (name, dimensions, bytes) of every tensor of a GGUF file (once per file
    version)."""
    reader = _tensor_reader()(path)
    field = reader.get_field("general.architecture")
    if field is None:
        raise EdgeError(f"{path} records no general.architecture")
    blocks = reader.get_field(f"{field.contents()}.block_count")
    return (str(field.contents()), int(blocks.contents()) if blocks is not None else 0,
            tuple((t.name, len(t.shape), int(t.n_bytes)) for t in reader.tensors))


@functools.lru_cache(maxsize=1)
def _tensor_reader() -> type:
    """``gguf.GGUFReader`` that steps over metadata arrays instead of decoding them item by item (a 49k-token
    vocabulary takes seconds to decode, and tensors are all a sensitivity measurement reads): those fields hold no
    values; scalars and strings do. Files of the other byte order are read in full."""
    import gguf

    class TensorReader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list, list]:
            if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            item_type = gguf.GGUFValueType(int(self._get(orig_offs, np.uint32)[0]))
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            offs = orig_offs + 12
            if item_type == gguf.GGUFValueType.STRING:
                view = memoryview(self.data)
                for _ in range(count):
                    offs += 8 + int.from_bytes(view[offs : offs + 8], sys.byteorder)
            elif item_type in self.gguf_scalar_to_np:
                offs += count * np.dtype(self.gguf_scalar_to_np[item_type]).itemsize
            else:  # arrays of arrays: the ordinary way
                return super()._get_field_parts(orig_offs, raw_type)
            return offs - orig_offs, [], [], [gguf.GGUFValueType.ARRAY, item_type]

    return TensorReader


def _imatrix_key(base: Artifact, options: Mapping[str, Any], calibration: Any, source: Any) -> dict[str, Any]:
    return {"source": source.sha256, "calibration": calibration.sha256,
            "chunks": int(options.get("imatrix_chunks") or 16), "base": base.precision, "version": 1}


def _sensitivity_key(base: Artifact, types: Sequence[str], options: Mapping[str, Any],
                     imatrix_key: Mapping[str, Any] | None, calibration: Any, source: Any) -> dict[str, Any]:
    weighted = calibration is not None and source is not None
    chunks = int(options.get("imatrix_chunks") or 16)
    return {"source": base.source_sha256, "base": base.precision, "base_bytes": base.path.stat().st_size,
            "types": list(types), "imatrix": dict(imatrix_key) if imatrix_key else None,
            "fisher": {"calibration": calibration.sha256, "chunks": chunks} if weighted else None,
            "allow_requantize": option_bool(options.get("allow_requantize", False)),
            "llama_cpp_python": require_llama_cpp().__version__, "version": 1}


def measured_sensitivity(base: Artifact, options: Mapping[str, Any], calibration: Any, source: Any) -> Any:
    """The sensitivity table a budgeted recipe with ``options`` would use, when it is already measured (cached),
    else ``None``: nothing is measured here."""
    imatrix = option_bool(options.get("imatrix", False))
    if imatrix and (calibration is None or source is None):
        return None
    key = _sensitivity_key(base, _candidate_types(options), options,
                           _imatrix_key(base, options, calibration, source) if imatrix else None, calibration, source)
    folder = cache.find("gguf-sensitivity", key)
    return None if folder is None else _read_table(str(folder))


@functools.lru_cache(maxsize=8)
def _read_table(folder: str) -> Any:
    """A cached sensitivity table (an entry's content never changes: its key is its content's recipe)."""
    import pandas as pd

    return pd.read_csv(Path(folder) / "sensitivity.csv", dtype={"tensor": str, "type": str})


def sensitivity_table(base: Artifact, types: Sequence[str], options: Mapping[str, Any], imatrix: _Imatrix | None,
                      calibration: Any = None, source: Any = None) -> Any:
    """The sensitivity table of ``base`` (:data:`mlflow_edge.recipes.TABLE_COLUMNS`): every quantizable tensor at the
    type llama.cpp really writes for each of ``types`` (fallbacks included), its size in bits and its predicted error
    (:func:`tensor_errors`; weighted by the diagonal Fisher of the source on ``calibration`` when both are given).
    Measured once per source, base, types, importance matrix and calibration text (cached)."""
    import pandas as pd

    chunks = int(options.get("imatrix_chunks") or 16)
    weighted = calibration is not None and source is not None
    key = _sensitivity_key(base, types, options, imatrix.key if imatrix else None, calibration, source)

    def measure(tmp: Path) -> None:
        fisher = fisher_factors(source, base.path, calibration, chunks) if weighted else None
        quantized = {kind: _run_quantize(base, tmp / f"{kind}.gguf", "Q8_0", options, imatrix,
                                         (recipes.Rule(".", kind),), pure=True) for kind in types}
        tensor_errors(base.path, quantized, fisher).to_csv(tmp / "sensitivity.csv", index=False)
        for path in quantized.values():
            path.unlink()

    folder = cache.get_or_build("gguf-sensitivity", key, measure)
    return pd.read_csv(folder / "sensitivity.csv", dtype={"tensor": str, "type": str})


def tensor_errors(base_path: Path, quantized: Mapping[str, Path],
                  fisher: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]] | None = None) -> Any:
    """One row per quantizable tensor and real type among the ``quantized`` files: params, bits and predicted error.

    The error of a tensor W quantized to Ŵ is Σ_ij r_i c_j (W - Ŵ)²_ij summed over its ``fisher`` factor pairs
    (r per row, c per column; :func:`fisher_factors`): twice the KL divergence it adds per token to second order.
    Without factors (no ``fisher``) it is the plain squared error; a tensor the factors miss gets that times the
    average over the others of mean(r) · mean(c).
    """
    import pandas as pd
    from gguf.quants import dequantize

    def tensors(path: Path) -> dict[str, Any]:
        return {t.name: t for t in _tensor_reader()(str(path)).tensors}

    names = quantizable_tensors(base_path)[1]
    fallback = _mean_factor(fisher) if fisher else 1.0
    base = tensors(base_path)
    outputs = [tensors(path) for path in quantized.values()]
    rows = []
    for name in names:
        reference = dequantize(base[name].data, base[name].tensor_type).astype(np.float32, copy=False)
        for output in outputs:
            tensor = output[name]
            squares = np.square(reference - dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
            error = _weighted_error(squares, (fisher or {}).get(name), fallback)
            rows.append((name, tensor.tensor_type.name, int(tensor.n_elements), 8 * int(tensor.n_bytes), error))
    table = pd.DataFrame(rows, columns=list(recipes.TABLE_COLUMNS))
    return table.drop_duplicates(["tensor", "type"], ignore_index=True)


def _weighted_error(squares: np.ndarray, factors: Sequence[tuple[np.ndarray, np.ndarray]] | None,
                    fallback: float) -> float:
    shaped = squares.reshape(-1, squares.shape[-1]).astype(np.float64)  # experts' rows one after the other
    usable = [(r, c) for r, c in factors or () if r.size == shaped.shape[0] and c.size == shaped.shape[1]]
    if not usable:
        return float(shaped.sum()) * fallback
    return float(sum((r.astype(np.float64) @ shaped) @ c.astype(np.float64) for r, c in usable))


def _mean_factor(fisher: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]) -> float:
    return float(np.mean([float(r.mean()) * float(c.mean()) for pairs in fisher.values() for r, c in pairs]))


def _uniform_error(table: Any, kind: str) -> float | None:
    """The table's summed error with every tensor at ``kind`` (its fallback's row where llama.cpp wrote that)."""
    by_tensor = table.set_index(["tensor", "type"])["error"]
    total = 0.0
    for tensor in table["tensor"].unique():
        for candidate in (kind, FALLBACK_TYPE.get(kind)):
            if candidate and (tensor, candidate) in by_tensor.index:
                total += float(by_tensor[(tensor, candidate)])
                break
        else:
            return None
    return total


def _fixed_bits(base_path: Path, table: Any) -> float:
    """Bits of a quantized file besides the table's tensors: the base file less those tensors, plus a margin for the
    alignment of each tensor (32 bytes)."""
    names = set(table["tensor"])
    tensors = gguf_layout(base_path)[2]
    table_bytes = sum(n_bytes for name, _, n_bytes in tensors if name in names)
    return 8.0 * (base_path.stat().st_size - table_bytes + 32 * len(tensors))


def _default_type(allocation: Mapping[str, str], table: Any) -> str:
    """The file type of a mixed recipe: that of the type holding most parameters (Q8_0 when it is none)."""
    params = table.drop_duplicates("tensor").set_index("tensor")["params"]
    held: dict[str, int] = {}
    for tensor, kind in allocation.items():
        held[kind] = held.get(kind, 0) + int(params[tensor])
    kind = max(held, key=lambda k: (held[k], k))
    ftypes = quant_types()
    return next((n for n in (kind, f"{kind}_S") if n in ftypes and n not in _UNQUANTIZED), "Q8_0")


class LlamaCppRunner:
    """A GGUF model on llama.cpp's C API: one sequence, logits per position, greedy generation."""

    def __init__(self, path: Path, threads: int, context_tokens: int) -> None:
        llama_cpp = require_llama_cpp()
        self._lib = llama_cpp
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=context_tokens,
                n_batch=context_tokens,
                n_ubatch=context_tokens,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError with a generic text
            raise EdgeError(f"llama.cpp cannot load {path}: {exc}") from exc
        self._ctx = self._llm.ctx
        self._n_vocab = self._llm.n_vocab()
        self._n_ctx = context_tokens
        self._batch = llama_cpp.llama_batch_init(context_tokens, 0, 1)

    def _reset(self) -> None:
        if self._llm is None:  # the context is freed: using it would crash the process
            raise EdgeError("this llama.cpp runner is closed")
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def _decode(self, tokens: Sequence[int], start: int, all_logits: bool) -> None:
        if start + len(tokens) > self._n_ctx:
            raise EdgeError(f"sequence of {start + len(tokens)} tokens exceeds the context of {self._n_ctx}")
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(tokens) - 1
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EdgeError(f"llama_decode failed with code {rc}")

    def _last_argmax(self) -> int:
        row = self._lib.llama_get_logits_ith(self._ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self._n_vocab,))))

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._reset()
        self._decode(tokens, 0, all_logits=True)
        data = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(data, shape=(len(tokens), self._n_vocab)).copy()

    def prefill(self, tokens: Sequence[int]) -> float:
        self._reset()
        start = time.perf_counter()
        self._decode(tokens, 0, all_logits=False)
        return time.perf_counter() - start

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        self._reset()
        start = time.perf_counter()
        self._decode(tokens, 0, all_logits=False)
        token = self._last_argmax()
        ttft = time.perf_counter() - start
        position = len(tokens)
        for _ in range(max_new_tokens - 1):
            self._decode([token], position, all_logits=False)
            position += 1
            token = self._last_argmax()
        total = time.perf_counter() - start
        return Generation(len(tokens), max_new_tokens, ttft, total)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None


# -- llama.cpp's converter, from the llama-cpp-python sdist ------------------------------------------------------
def converter_dir() -> Path:
    """``vendor/llama.cpp`` scripts (converter, ``conversion/``, ``gguf-py``) of the installed llama-cpp-python
    sdist."""
    version = require_llama_cpp().__version__
    return cache.get_or_build("llama.cpp-scripts", {"llama_cpp_python": version},
                              lambda tmp: _extract_scripts(version, tmp))


def supported_architectures() -> frozenset[str]:
    """HF architectures ``convert_hf_to_gguf.py`` registers (``@ModelBase.register("LlamaForCausalLM", …)``)."""
    import re

    folder = converter_dir()
    names: set[str] = set()
    for script in [folder / "convert_hf_to_gguf.py", *sorted((folder / "conversion").rglob("*.py"))]:
        for args in re.findall(r"ModelBase\.register\(([^)]*)\)", script.read_text(encoding="utf-8"), re.DOTALL):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return frozenset(names)


def _extract_scripts(version: str, out_dir: Path) -> None:
    from mlflow_edge.sources import pinned_download

    if version not in SDIST_SHA256:
        raise EdgeError(f"no pinned sdist hash for llama-cpp-python {version} (known: {', '.join(SDIST_SHA256)}); "
                        "convert_hf_to_gguf.py comes from that sdist")
    sdist = pinned_download(f"llama-cpp-python=={version}", f"llama_cpp_python-{version}.tar.gz",
                            SDIST_SHA256[version], binary=False)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(out_dir, members=members, filter="data")


# -- importance matrix ---------------------------------------------------------------------------------------------
def compute_imatrix(source: Any, base: Artifact, calibration: Any, out_path: Path, chunks: int = 16,
                    chunk_tokens: int = 512) -> Path:
    """Mean squared input activation per column of every matmul weight, from calibration text.

    Computed with the source model in ``transformers`` (forward hooks on each ``nn.Linear``), named by llama.cpp's
    tensor names, and written in llama.cpp's GGUF imatrix format (``<tensor>.in_sum2`` and ``<tensor>.counts``).
    """
    import gguf
    import torch

    arch_name = quantizable_tensors(base.path)[0]
    model, tokens, n_chunks = _calibration_model(source, calibration, chunks, chunk_tokens)
    modules = _matmul_modules(model, base.path)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: Any) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0, dtype=torch.float64)
        counts[name] = counts.get(name, 0) + x.shape[0]

    hooks = [module.register_forward_hook(lambda _m, inputs, _o, name=name: record(name, inputs[0]))
             for name, module in modules.items()]
    with torch.inference_mode():
        for i in range(n_chunks):
            model(tokens[i * chunk_tokens : (i + 1) * chunk_tokens].unsqueeze(0))
    for handle in hooks:
        handle.remove()
    if not sums:
        raise EdgeError(f"no matmul weights of {source.name} could be matched to llama.cpp tensor names")

    writer = gguf.GGUFWriter(str(out_path), arch=arch_name)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [calibration.label])
    writer.add_uint32("imatrix.chunk_count", n_chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_tokens)
    for name in sorted(sums):
        writer.add_tensor(f"{name}.in_sum2", sums[name].to(torch.float32).numpy())
        writer.add_tensor(f"{name}.counts", np.array([counts[name]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _calibration_model(source: Any, calibration: Any, chunks: int, chunk_tokens: int) -> tuple[Any, Any, int]:
    """The source model in ``transformers`` (fp32, eval mode), the calibration tokens and how many whole chunks of
    ``chunk_tokens`` (at most ``chunks``) they hold."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, use_safetensors=True)
    model.eval()
    tokens = tokenizer(calibration.text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_chunks = min(chunks, len(tokens) // chunk_tokens)
    if n_chunks < 1:
        raise EdgeError(f"calibration text {calibration.label} has fewer than {chunk_tokens} tokens")
    return model, tokens, n_chunks


def _matmul_modules(model: Any, base_path: Path) -> dict[str, Any]:
    """The ``nn.Linear`` modules of ``model`` by the llama.cpp name of their weight in the GGUF at ``base_path``."""
    import gguf
    import torch

    arch_name, block_count, layout = gguf_layout(base_path)
    gguf_names = {name for name, _, _ in layout}
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    name_map = gguf.get_tensor_name_map(arch, block_count)
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            mapped = name_map.get_name(module_name)
            if mapped and f"{mapped}.weight" in gguf_names:
                found[f"{mapped}.weight"] = module
    return found


def fisher_factors(source: Any, base_path: Path, calibration: Any, chunks: int = 16,
                   chunk_tokens: int = 512) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Diagonal Fisher factors of every matmul weight of ``source`` on calibration text, by llama.cpp tensor name:
    (mean squared output gradient per row, mean squared input per column — the importance matrix), the gradient
    taken of the log-likelihood of tokens sampled from the model itself (the Fisher of its own distribution, which
    the KL divergence to it expands into). Token embeddings get (token frequency per row, mean squared gradient per
    column) for their lookup, plus the output head's pair when they are tied to it."""
    import torch

    model, tokens, n_chunks = _calibration_model(source, calibration, chunks, chunk_tokens)
    modules = _matmul_modules(model, base_path)
    head = model.get_output_embeddings()
    if "token_embd.weight" in quantizable_tensors(base_path)[1] and "output.weight" not in modules and head is not None:
        modules["token_embd.weight"] = head  # tied: the embeddings are the output head too
    stats = _FisherSums()
    hooks = [h for name, module in modules.items() for h in stats.watch(name, module)]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: stats.watch_lookup(out)))
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    frequency = torch.ones(vocab, dtype=torch.float64)  # add-one: no row is free
    for i in range(n_chunks):
        chunk = tokens[i * chunk_tokens : (i + 1) * chunk_tokens]
        frequency += torch.bincount(chunk, minlength=vocab).to(torch.float64)
        logits = model(chunk.unsqueeze(0)).logits[0]
        sampled = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=generator)[:, 0]
        torch.nn.functional.cross_entropy(logits, sampled, reduction="sum").backward()
    for handle in hooks:
        handle.remove()
    factors = {name: [stats.pair(name)] for name in modules if name in stats.grads}
    factors.setdefault("token_embd.weight", []).append(
        ((frequency / frequency.sum()).numpy(), stats.pair("lookup")[0]))
    return factors


class _FisherSums:
    """Sums of squared inputs and output gradients per module, gathered by hooks."""

    def __init__(self) -> None:
        self.inputs: dict[str, Any] = {}
        self.grads: dict[str, Any] = {}
        self.rows: dict[str, int] = {}

    def _add(self, table: dict[str, Any], name: str, value: Any) -> None:
        import torch

        value = value.detach().reshape(-1, value.shape[-1])
        table[name] = table.get(name, 0) + (value * value).sum(dim=0, dtype=torch.float64)
        if table is self.grads:
            self.rows[name] = self.rows.get(name, 0) + value.shape[0]

    def watch(self, name: str, module: Any) -> list[Any]:
        return [module.register_forward_hook(lambda _m, inputs, _o: self._add(self.inputs, name, inputs[0])),
                module.register_full_backward_hook(lambda _m, _gi, grads: self._add(self.grads, name, grads[0]))]

    def watch_lookup(self, embedded: Any) -> Any:
        """Make the embeddings' output part of the graph (the weights are frozen) and record its gradient."""
        embedded.requires_grad_(True)
        embedded.register_hook(lambda grad: self._add(self.grads, "lookup", grad))
        return embedded

    def pair(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean squared output gradient per row, mean squared input per column) of one module."""
        rows = max(self.rows.get(name, 0), 1)
        columns = self.inputs.get(name)
        return ((self.grads[name] / rows).numpy(),
                (columns / rows).numpy() if columns is not None else np.ones(1))


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Mean squared activations per tensor from a GGUF imatrix file (``in_sum2 / counts``)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    result = {}
    for name, values in tensors.items():
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            count = float(tensors[base + ".counts"].reshape(-1)[0])
            result[base] = (values.reshape(-1) / max(count, 1.0)).astype(np.float32)
    return result


def _quantize_worker(spec: dict[str, Any]) -> int:
    """Runs in a child process so that a llama.cpp abort cannot take the caller down."""
    import ctypes

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec["ftype"]
    params.nthread = spec["nthread"]
    params.allow_requantize = spec["allow_requantize"]
    params.pure = spec["pure"]
    params.quantize_output_tensor = spec["quantize_output_tensor"]
    if spec["output_tensor_type"] is not None:
        params.output_tensor_type = spec["output_tensor_type"]
    if spec["token_embedding_type"] is not None:
        params.token_embedding_type = spec["token_embedding_type"]
    keep_alive = []
    if spec.get("tensor_types"):  # llama-quantize --tensor-type PATTERN=TYPE, in order; the first match wins
        rules = spec["tensor_types"]
        overrides = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
        for i, (pattern, type_id) in enumerate(rules):
            encoded = pattern.encode()
            keep_alive.append(encoded)
            overrides[i].pattern = encoded
            overrides[i].type = int(type_id)
        overrides[len(rules)].pattern = None
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep_alive.append(overrides)
    if spec["imatrix"]:
        entries = read_imatrix(Path(spec["imatrix"]))
        array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, values) in enumerate(sorted(entries.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            encoded = name.encode()
            keep_alive += [values, encoded]
            array[i].name = encoded
            array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[i].size = values.size
        array[len(entries)].name = None
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(array)
    rc = llama_cpp.llama_model_quantize(spec["input"].encode(), spec["output"].encode(), ctypes.byref(params))
    if rc != 0:
        print(f"error: llama_model_quantize returned {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(_quantize_worker(json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())))
