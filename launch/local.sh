#!/usr/bin/env bash
# One machine: set up, then train, as one process or as N processes joined by jax.distributed.
#
#   bash launch/local.sh configs/audio.py runs/audio_tiny [--config.x=y ...]
#   bash launch/local.sh --processes=2 --cpu_devices=2 configs/image.py runs/image_2x2
#   bash launch/local.sh --processes=8 --gpus_per_process=1 configs/audio.py:variant=base runs/a
#   bash launch/local.sh --dry-run --processes=2 configs/image.py runs/image_2x2
#
# Options (before CONFIG):
#   --processes=N         N processes on this machine, coordinator localhost:PORT (default 1: one
#                         process with every local device; the usual choice)
#   --gpus_per_process=K  process i uses GPUs i*K ... i*K+K-1 (--local_device_ids)
#   --cpu_devices=K       K fake CPU devices per process (XLA_FLAGS): try a multi-host layout on a
#                         laptop, as tests/test_multihost.py does
#   --port=P              the coordinator's port (default 12355)
#   --log_dir=DIR         where processes 1 ... N-1 write their output (default /tmp/d2v_jax_logs);
#                         process 0 writes to this terminal
#   --dry-run             print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: launch/local.sh [--dry-run] [--processes=N] [--gpus_per_process=K] [--cpu_devices=K] [--port=P] [--log_dir=DIR] CONFIG WORKDIR [main.py flags...]"
dry_run=false processes=1 gpus_per_process=0 cpu_devices=0 port=12355 log_dir=/tmp/d2v_jax_logs
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=true ;;
    --processes=*) processes=${1#*=} ;;
    --gpus_per_process=*) gpus_per_process=${1#*=} ;;
    --cpu_devices=*) cpu_devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    *) echo "unknown option $1; $usage" >&2; exit 2 ;;
  esac
  shift
done
config=${1:?$usage}
workdir=${2:?$usage}
shift 2

source launch/lib.sh

run bash launch/setup.sh
main=(.venv/bin/python main.py --config="$config" --workdir="$workdir")
if [[ $processes == 1 ]]; then
  envs=()
  [[ $cpu_devices == 0 ]] || envs=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
  run "${envs[@]}" "${main[@]}" "$@"
  exit
fi

run mkdir -p "$log_dir"
pids=()
for ((i = 0; i < processes; i++)); do
  cmd=("${main[@]}" --coordinator_address="localhost:$port" --num_processes="$processes" --process_id="$i")
  if [[ $gpus_per_process != 0 ]]; then
    ids=$(seq -s, $((i * gpus_per_process)) $((i * gpus_per_process + gpus_per_process - 1)))
    cmd+=(--local_device_ids="$ids")
  fi
  [[ $cpu_devices == 0 ]] || cmd=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices" "${cmd[@]}")
  cmd+=("$@")
  log="$log_dir/process_$i.log"
  if $dry_run; then
    if ((i == 0)); then echo "$(quote_cmd "${cmd[@]}") &"; else echo "$(quote_cmd "${cmd[@]}") > $(quote_cmd "$log") 2>&1 &"; fi
  elif ((i == 0)); then
    "${cmd[@]}" &
    pids+=($!)
  else
    "${cmd[@]}" > "$log" 2>&1 &
    pids+=($!)
  fi
done
if $dry_run; then
  echo wait
  exit
fi
# A process that fails takes the others down (they would wait for it at the next collective).
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=1
    echo "local.sh: a process failed; logs of processes 1..$((processes - 1)) in $log_dir" >&2
    break
  fi
done
exit $status
