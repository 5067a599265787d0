#!/usr/bin/env bash
# One machine (CPU, one or more GPUs, or a single TPU VM): set up, then train.
#
#   bash launch/local.sh configs/audio.py runs/audio_tiny [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
bash launch/setup.sh
exec .venv/bin/python main.py --config="$config" --workdir="$workdir" "$@"
