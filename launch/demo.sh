#!/usr/bin/env bash
# The end-to-end demo on the built-in demo photographs (no download needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m deblur.shard --demo --out shards/demo
# Train (one process; rerunning resumes). Extra args are config overrides, e.g. train.max_steps=50.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python launch/train.py --config configs/demo.yaml "$@"
