"""llama.cpp / GGUF backend (llama-cpp-python).

- ``convert``: llama.cpp's own ``convert_hf_to_gguf.py`` (shipped in the llama-cpp-python sdist, fetched once into the
  cache) writes ``f32``/``f16``/``bf16``/``q8_0`` GGUF.
- ``quantize``: ``llama_model_quantize`` with every type it offers (``Q2_K`` … ``Q8_0``, ``IQ*``, ``TQ*``), and the
  options of ``llama-quantize``: ``allow_requantize``, ``pure``, ``output_tensor_type``, ``token_embedding_type``,
  ``leave_output_tensor``, and an importance matrix (``imatrix``) computed from calibration text.
- ``load``: a :class:`LlamaCppRunner` on the llama.cpp C API (per-position logits, timed greedy generation).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from mlflow_edge import cache, procs
from mlflow_edge.backends.base import Artifact, Generation, OptionSpec, option_bool, typed_options
from mlflow_edge.errors import EdgeError

CONVERT_PRECISIONS = ("f32", "f16", "bf16", "q8_0")
# llama-quantize refuses these without an importance matrix
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"})
_GGUF_NAME = "model.gguf"
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
        return tuple(quant_types())

    def option_specs(self) -> Sequence[OptionSpec]:
        return (
            OptionSpec("imatrix", bool, False, help="compute an importance matrix from calibration text"),
            OptionSpec("imatrix_chunks", int, 16, help="calibration chunks of 512 tokens for the importance matrix"),
            OptionSpec("allow_requantize", bool, False, help="allow re-quantizing tensors that are already quantized"),
            OptionSpec("pure", bool, False, help="quantize every tensor to the default type (no k-quant mixtures)"),
            OptionSpec("leave_output_tensor", bool, False, help="keep output.weight unquantized"),
            OptionSpec("output_tensor_type", str, None, help="ggml type for output.weight (e.g. Q8_0)"),
            OptionSpec("token_embedding_type", str, None, help="ggml type for token_embd.weight (e.g. Q8_0)"),
            OptionSpec("nthread", int, 0, help="quantization threads (0: all cores)"),
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
        return ({"llamacpp.precision": "Q4_K_M", "llamacpp.imatrix": False},)  # llama.cpp's recommended default

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        precision = trial.suggest_categorical("llamacpp.precision", [
            "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S",
            "Q5_K_M", "Q6_K", "Q8_0",
        ])
        options: dict[str, Any] = {"imatrix": trial.suggest_categorical("llamacpp.imatrix", [False, True])}
        if options["imatrix"]:
            options["imatrix_chunks"] = 8
        return precision, options

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
        types = quant_types()
        qtype = precision.upper()
        if qtype not in types:
            raise EdgeError(f"unknown GGUF quantization type '{precision}' (choose from {', '.join(types)})")
        use_imatrix = option_bool(options.get("imatrix", False))
        if qtype in IMATRIX_REQUIRED and not use_imatrix:
            raise EdgeError(f"{qtype} needs an importance matrix: set llamacpp.imatrix=true "
                            "(computed from calibration text)")
        for key in ("output_tensor_type", "token_embedding_type"):
            if options.get(key):
                ggml_type_id(options[key])  # validate early
        if _is_quantized(base) and not option_bool(options.get("allow_requantize", False)):
            raise EdgeError(f"{base.path.name} is already quantized ({base.precision}); "
                            "set llamacpp.allow_requantize=true")
        out_dir.mkdir(parents=True, exist_ok=True)
        imatrix_path = None
        recorded = {k: v for k, v in options.items() if v not in (None, "", False, 0) or k == "imatrix"}
        recorded["imatrix"] = use_imatrix
        if use_imatrix:
            if calibration is None or source is None:
                raise EdgeError("an importance matrix needs calibration text and the source model")
            chunks = int(options.get("imatrix_chunks") or 16)
            key = {"source": source.sha256, "calibration": calibration.sha256, "chunks": chunks,
                   "base": base.precision, "version": 1}
            cached = cache.get_or_build(
                "imatrix", key, lambda tmp: compute_imatrix(source, base, calibration, tmp / "imatrix.gguf", chunks)
            )
            imatrix_path = out_dir / "imatrix.gguf"
            shutil.copyfile(cached / "imatrix.gguf", imatrix_path)
            recorded.update({"imatrix_chunks": chunks, "calib.dataset": calibration.label,
                             "calib.sha256": calibration.sha256})
        spec = {
            "input": str(base.path),
            "output": str(out_dir / (_GGUF_NAME + ".partial")),
            "ftype": types[qtype],
            "nthread": int(options.get("nthread") or 0),
            "allow_requantize": option_bool(options.get("allow_requantize", False)),
            "pure": option_bool(options.get("pure", False)),
            "quantize_output_tensor": not option_bool(options.get("leave_output_tensor", False)),
            "output_tensor_type": _tensor_type(options, "output_tensor_type"),
            "token_embedding_type": _tensor_type(options, "token_embedding_type"),
            "imatrix": str(imatrix_path) if imatrix_path else None,
        }
        partial = Path(spec["output"])
        proc = procs.run(
            [sys.executable, "-m", "mlflow_edge.backends.llamacpp", json.dumps(spec)], capture_output=True, text=True
        )
        if proc.returncode != 0 or not partial.is_file():
            full = _full_disk(out_dir)  # before the partial file goes: llama.cpp only says that it failed
            partial.unlink(missing_ok=True)
            raise EdgeError(f"llama.cpp could not quantize to {qtype}: {procs.last_error_line(proc.stderr)}{full}")
        final = partial.rename(out_dir / _GGUF_NAME)
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


def _is_quantized(artifact: Artifact) -> bool:
    return artifact.precision.upper() not in {"F32", "F16", "BF16"}


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = gguf.GGUFReader(str(base.path))
    arch_name = reader.get_field("general.architecture").contents()
    block_count = int(reader.get_field(f"{arch_name}.block_count").contents())
    gguf_names = {t.name for t in reader.tensors}
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    name_map = gguf.get_tensor_name_map(arch, block_count)

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, use_safetensors=True)
    model.eval()
    tokens = tokenizer(calibration.text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_chunks = min(chunks, len(tokens) // chunk_tokens)
    if n_chunks < 1:
        raise EdgeError(f"calibration text {calibration.label} has fewer than {chunk_tokens} tokens")

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        mapped = name_map.get_name(module_name)
        tensor_name = f"{mapped}.weight" if mapped else None
        if tensor_name is None or tensor_name not in gguf_names:
            continue

        def hook(_module, inputs, _output, name=tensor_name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0, dtype=torch.float64)
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(hook))
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
    sys.exit(_quantize_worker(json.loads(sys.argv[1])))
