#!/usr/bin/env bash
# Print the full pinned environment (pyproject.toml's dependencies plus the test extra) that
# requirements.lock records. torch is overridden to the local CPU wheel so that no CUDA stack
# resolves. Review the output, then merge new pins into requirements.lock by hand (keep its header).
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-.venv/bin/uv}
"$uv" pip compile pyproject.toml --extra test --find-links /opt/wheels \
  --python-version 3.11 --override <(echo "torch==2.13.0+cpu") --no-header --no-annotate
