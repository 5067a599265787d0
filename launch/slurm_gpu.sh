#!/usr/bin/env bash
# SLURM, multi-node GPUs: one task per node, all GPUs of a node in that task (JAX sees them as
# local devices); the tasks join through jax.distributed, which reads SLURM's variables.
#
# From a login node (the repository on a filesystem every node sees):
#   bash launch/slurm_gpu.sh --nodes=8 --gpus_per_node=8 configs/audio.py:variant=base \
#       /shared/runs/audio_base --config.input.source=manifest \
#       --config.input.path=/data/librispeech/train.tsv
#   bash launch/slurm_gpu.sh --dry-run --nodes=8 ...    # print the commands, submit nothing
#
# It sets up .venv with the CUDA build of jax once, then submits itself with sbatch; inside the
# job (SLURM_JOB_ID set) it starts the tasks with srun. Options (before CONFIG):
#   --nodes=N (default 1)  --gpus_per_node=G (default 8)  --time=HH:MM:SS (default 24:00:00)
#   --partition=P  --account=A  (passed to sbatch when given)
#   --dry-run     print the commands instead of running them
#SBATCH --job-name=d2v-jax
#SBATCH --ntasks-per-node=1
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
usage="usage: launch/slurm_gpu.sh [--dry-run] [--nodes=N] [--gpus_per_node=G] [--time=T] [--partition=P] [--account=A] CONFIG WORKDIR [main.py flags...]"
dry_run=false nodes=1 gpus_per_node=8 time=24:00:00 sbatch_extra=()
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=true ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus_per_node=${1#*=} ;;
    --time=*) time=${1#*=} ;;
    --partition=* | --account=*) sbatch_extra+=("$1") ;;
    *) echo "unknown option $1; $usage" >&2; exit 2 ;;
  esac
  shift
done
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
source launch/lib.sh
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
main=(.venv/bin/python main.py --multi_host --config="$config" --workdir="$workdir" "$@")

if [[ -n ${SLURM_JOB_ID:-} ]]; then  # inside the job: one task per node
  run srun --kill-on-bad-exit=1 "${main[@]}"
  exit
fi

run bash launch/setup.sh
run .venv/bin/pip install --quiet "jax[cuda12]==$jax_version"
run mkdir -p logs
run sbatch --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus_per_node" \
  --time="$time" --output=logs/d2v-jax-%j.out "${sbatch_extra[@]}" \
  launch/slurm_gpu.sh "$config" "$workdir" "$@"
if $dry_run; then  # what the job then runs on its first node
  echo "# in the job:"
  quote_cmd srun --kill-on-bad-exit=1 "${main[@]}"
fi
