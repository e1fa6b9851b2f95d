#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the main job: multi-head fine-tuning, UPGrad vs the mean of the losses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python examples/multi_head_finetune.py "$@"
