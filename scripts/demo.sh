#!/usr/bin/env bash
# Set up (first run), train the MNIST demo (about ten minutes on a 2-core CPU) and write its pictures to
# outputs/demo. Extra arguments are config overrides, e.g. train.steps=500.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/torchdiffusion demo "$@"
