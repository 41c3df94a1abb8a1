#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job end to end on the embedded default:
# shipped base model, shipped task, SQLite-backed MLflow under ./data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ADAPTERHUB_HOME="${ADAPTERHUB_HOME:-$(pwd)/data}"
exec .venv/bin/adapterhub demo "$@"
