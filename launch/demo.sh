#!/usr/bin/env bash
# The end-to-end demo on the built-in demo photographs (no download needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m deblur.shard --demo --out shards/demo
echo "Demo shards are in shards/demo. Training is not implemented yet (issue 4)."
