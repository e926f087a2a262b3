#!/usr/bin/env bash
# Installs (scripts/setup.sh) and runs the main job on its embedded default: `can demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
can demo "$@"
