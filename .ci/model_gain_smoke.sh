#!/usr/bin/env bash
# The model-gain benchmark (bench/model_gain.py) at toy sizes on the CPU: proves the script runs
# end to end (model, patch, training step, decoding, table) without a GPU. Seconds, not minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" bench/model_gain.py --device cpu --tiny --rounds 1 --iters 2
