#!/usr/bin/env bash
# SLURM, one task per node, all GPUs of a node in that task (JAX sees them as local devices).
#
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm_gpu.sh \
#       configs/audio.py:variant=base /shared/runs/audio_base --config.input.source=manifest \
#       --config.input.path=/data/librispeech/train.tsv
#
# jax.distributed.initialize() reads the coordinator and process ids from SLURM's variables.
# Run `bash launch/setup.sh` once on a login node first, and install the CUDA build of jax:
#   .venv/bin/pip install 'jax[cuda12]==0.12.0.1'
#SBATCH --job-name=d2v-jax
#SBATCH --ntasks-per-node=1
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
config=${1:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [flags...]}
shift 2
srun .venv/bin/python main.py --multi_host --config="$config" --workdir="$workdir" "$@"
