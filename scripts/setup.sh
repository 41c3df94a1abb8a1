#!/usr/bin/env bash
# Create .venv at the repository root from requirements.lock (idempotent, offline-safe where
# wheels are cached). torch comes from the local CPU wheel so no CUDA stack is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
stamp=.venv/.adapterhub-lock.sha
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
.venv/bin/python -m pip install --quiet "uv==0.12.24"
export UV_LINK_MODE=copy
.venv/bin/uv pip install --python .venv/bin/python --compile-bytecode \
  --find-links /opt/wheels -r requirements.lock
.venv/bin/uv pip install --python .venv/bin/python --compile-bytecode --no-deps -e "$root"
# The engine's native kernels, LoRA and decode attention (under a second each); without a C
# compiler the engine falls back to its torch paths, so a failure here is a warning, not an error.
.venv/bin/python -m serving.engine.kernels >/dev/null \
  || echo "warning: native kernels not built (no C compiler?); the engine will use torch" >&2
echo "$want" > "$stamp"
