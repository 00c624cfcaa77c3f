#!/usr/bin/env bash
# Set up everything mlflow-edge needs in ./.venv: PyTorch, the package with its [llamacpp,openvino,onnxruntime,mlx,azure,scaleout,test] extras,
# and llama-cpp-python built from source once per CPU (the wheel is cached under ~/.cache/mlflow-edge/wheels).
# Re-running is cheap: nothing is reinstalled while setup.cfg and this script are unchanged.
# Usage: scripts/setup.sh [extras]   (default extras: llamacpp,openvino,onnxruntime,mlx,azure,scaleout,test)
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-llamacpp,openvino,onnxruntime,mlx,azure,scaleout,test}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CACHE="${MLFLOW_EDGE_CACHE:-$HOME/.cache/mlflow-edge}"
LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"
if [[ ",$EXTRAS," == *",openvino,"* || ",$EXTRAS," == *",all,"* ]]; then
  # optimum-intel needs torchvision, which imports only beside this pair (both lie on this machine's disk)
  TORCH=(torch==2.14.1 torchvision==0.29.1)
else
  TORCH=(torch==2.13.0)   # the CPU build (a plain 'torch' would pull a multi-GB CUDA build)
fi

say() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stamp_value="$(cat setup.cfg "$0" | sha256sum | cut -c1-16)-$EXTRAS"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.mlflow-edge-setup" 2>/dev/null)" = "$stamp_value" ]; then
  say "environment $VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip setuptools wheel

torch_version="${TORCH[0]#torch==}"
if [ "$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" != "$torch_version" ]; then
  say "installing ${TORCH[*]}"
  "${PIP[@]}" install --quiet "${TORCH[@]}"
fi

find_links=()
if [[ ",$EXTRAS," == *",llamacpp,"* || ",$EXTRAS," == *",all,"* ]]; then
  # llama.cpp is compiled for this CPU (-march=native): one cached wheel per CPU flag set
  cpu_key="$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)"
  wheels="$CACHE/wheels/$cpu_key"
  mkdir -p "$wheels"
  if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    say "building $LLAMA_CPP_PYTHON from source (once per machine, about 4 minutes on 2 cores)"
    "${PIP[@]}" wheel --quiet --no-deps --no-binary llama-cpp-python "$LLAMA_CPP_PYTHON" -w "$wheels"
  else
    say "reusing the cached llama-cpp-python wheel in $wheels"
  fi
  find_links=(--find-links "$wheels")
fi

if [[ ",$EXTRAS," == *",scaleout,"* || ",$EXTRAS," == *",all,"* ]]; then
  scripts/install-postgres.sh   # the scale-out tests run a real PostgreSQL
fi

say "installing mlflow-edge[$EXTRAS]"
"${PIP[@]}" install --quiet "${find_links[@]}" -e ".[$EXTRAS]"
"${PIP[@]}" check
echo "$stamp_value" > "$VENV/.mlflow-edge-setup"
say "done: $("$VENV/bin/python" -c 'import mlflow, mlflow_edge; print("mlflow", mlflow.__version__, "mlflow-edge", mlflow_edge.__version__)')"
