#!/usr/bin/env bash
# Installs (scripts/setup.sh) and runs the test suite; extra arguments go to pytest. Then the vLLM sampler's tests
# in their own virtualenv, layered on the suite's environment (scripts/test_vllm.sh; CAN_SKIP_VLLM=1 leaves them out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
(
  [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
  python -m pytest "$@"
)
base_python=$([ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate; python -c "import sys; print(sys.executable)")
[ -n "${CAN_SKIP_VLLM:-}" ] || env -u VIRTUAL_ENV -u CONDA_PREFIX CAN_BASE_PYTHON="$base_python" bash scripts/test_vllm.sh
