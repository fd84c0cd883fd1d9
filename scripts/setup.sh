#!/usr/bin/env bash
# Create .venv and install ream-modifiers with its dev tools.
# torch is installed first and pinned: on a machine without a GPU this takes the
# CPU build, so no CUDA wheels are downloaded; the later install is then satisfied.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev${EXTRAS:+,$EXTRAS}]"
"$VENV/bin/python" -c "import torch, llmcompressor, ream_modifiers; print('torch', torch.__version__, '| llmcompressor', llmcompressor.__version__, '| ream_modifiers', ream_modifiers.__version__)"
