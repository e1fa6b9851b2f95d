#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install hf_jd with its test extra.
# torch is installed first, on its own, when the venv has none: `pip install torch==2.13.0` takes whatever build
# the configured package index and find-links offer (a CPU wheel on a machine whose find-links hold one; from
# PyPI on Linux that is the CUDA build), and the editable install below then keeps that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
