"""A logged model's environment builds from its own files: a fresh venv with nothing but the model's
``requirements.txt`` loads it (the loader from the model's ``code/``, mlflow-edge not installed) and predicts."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_edge import cache, workflow
from mlflow_edge.flavors import gguf

pytest.importorskip("llama_cpp")

PROMPT = "The capital of France is"
LLAMA_CPP_WHEEL = "llama_cpp_python-0.3.36-*.whl"
PROBE = """
import importlib.metadata, json, sys
import mlflow.pyfunc
try:
    importlib.metadata.distribution("mlflow-edge")
    installed = True
except importlib.metadata.PackageNotFoundError:
    installed = False
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict([sys.argv[2]], params={"max_tokens": 4})
try:
    model.predict([sys.argv[2]], params={"bogus": 1})
    refused = None
except Exception as exc:
    refused = str(exc)
import mlflow_edge
print(json.dumps({"installed": installed, "module": mlflow_edge.__file__, "answer": answer, "refused": refused,
                  "heavy": sorted(m for m in ("torch", "transformers", "openvino") if m in sys.modules)}))
"""


def llama_cpp_wheels() -> Path:
    """The folder of the llama-cpp-python wheel that scripts/setup.sh built for this CPU (one per CPU flag set)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    flags = next((line for line in lines if line.startswith("flags")), platform.machine())
    return cache.cache_root() / "wheels" / hashlib.sha256(f"{flags}\n".encode()).hexdigest()[:12]


@pytest.mark.slow
def test_a_saved_gguf_model_runs_in_a_venv_built_from_its_requirements_only(tiny_source, tmp_path: Path) -> None:
    wheels = llama_cpp_wheels()
    if not list(wheels.glob(LLAMA_CPP_WHEEL)):
        pytest.skip(f"no cached {LLAMA_CPP_WHEEL} in {wheels} (scripts/setup.sh builds it)")
    model_dir = tmp_path / "model"
    gguf.save_model(workflow.convert(tiny_source, "llamacpp", "f16").path, model_dir, n_ctx=256)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --no-compile: byte-compiling all of mlflow and its dependencies took most of the install; the probe compiles
    # what it imports
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", "--find-links", str(wheels),
                           "--only-binary", "llama-cpp-python", "-r", str(model_dir / "requirements.txt")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]

    done = subprocess.run([str(python), "-c", PROBE, str(model_dir), PROMPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["installed"] is False
    assert Path(result["module"]).resolve() == (model_dir / "code" / "mlflow_edge" / "__init__.py").resolve()
    assert result["heavy"] == []  # the loader imports llama.cpp, numpy, pandas and mlflow: nothing else
    import mlflow.pyfunc

    assert result["answer"] == mlflow.pyfunc.load_model(str(model_dir)).predict([PROMPT], params={"max_tokens": 4})
    assert result["refused"].startswith("unknown param 'bogus'")
