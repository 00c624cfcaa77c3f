"""llama.cpp's own ``convert_hf_to_gguf.py``, from the llama-cpp-python sdist (fetched hash-pinned, extracted once
into the cache), run in a child process on a local Hugging Face folder."""

from __future__ import annotations

import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Any

from mlflow_edge import cache, procs
from mlflow_edge.backends.llamacpp.ggml import CONVERT_PRECISIONS, GGUF_NAME, require_llama_cpp
from mlflow_edge.errors import EdgeError

SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
"""sha256 of the llama-cpp-python sdists whose convert_hf_to_gguf.py runs here (pip fetches them hash-pinned)."""


def convert_hf_to_gguf(source: Any, out_dir: Path, precision: str) -> Path:
    """``source`` written by ``convert_hf_to_gguf.py`` as ``out_dir/model.gguf`` at ``precision`` (lower case); the
    file appears only when it is complete."""
    if precision not in CONVERT_PRECISIONS:
        raise EdgeError(f"unknown GGUF conversion type '{precision}' (choose from {', '.join(CONVERT_PRECISIONS)})")
    _refuse_remote_code(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    script = converter_dir() / "convert_hf_to_gguf.py"
    partial = out_dir / (GGUF_NAME + ".partial")
    cmd = [sys.executable, str(script), str(source.path), "--outfile", str(partial), "--outtype", precision]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the sdist's own gguf-py
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the converter reads the local folder only
    proc = procs.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise EdgeError(f"convert_hf_to_gguf.py failed for {source.name}: {procs.last_error_line(proc.stderr)}")
    return partial.rename(out_dir / GGUF_NAME)


def _refuse_remote_code(source: Any) -> None:
    """convert_hf_to_gguf.py loads some tokenizers with ``trust_remote_code=True``: never start it on a folder that
    could make that run code."""
    from mlflow_edge.sources import remote_code_reason

    reason = remote_code_reason(Path(source.path))
    if reason:
        raise EdgeError(f"convert_hf_to_gguf.py is not run on {source.name}: it could execute the model's own code "
                        f"({reason})")


def converter_dir() -> Path:
    """``vendor/llama.cpp`` scripts (converter, ``conversion/``, ``gguf-py``) of the installed llama-cpp-python
    sdist."""
    version = require_llama_cpp().__version__
    return cache.get_or_build("llama.cpp-scripts", {"llama_cpp_python": version},
                              lambda tmp: _extract_scripts(version, tmp))


def supported_architectures() -> frozenset[str]:
    """HF architectures ``convert_hf_to_gguf.py`` registers (``@ModelBase.register("LlamaForCausalLM", …)``)."""
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
