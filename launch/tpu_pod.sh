#!/usr/bin/env bash
# Cloud TPU VM or pod slice: create (or reuse) the TPU VM, copy or clone this repository onto
# every worker, set up each one, and run main.py on all of them at once (`--worker=all`), one
# process per host; jax.distributed.initialize() finds the other hosts by itself. The output
# streams here (process 0 logs; the others print warnings and errors only).
#
#   bash launch/tpu_pod.sh --tpu=d2v-v4-64 --zone=us-central2-b --accelerator=v4-64 \
#       configs/audio.py:variant=base gs://my-bucket/runs/audio_base \
#       --config.input.source=tfds --config.input.path=librispeech \
#       --config.input.tfds_data_dir=gs://my-bucket/tfds
#   bash launch/tpu_pod.sh --dry-run --tpu=... ...     # print the commands, run nothing
#
# Data and work directory on GCS: every gs://BUCKET/... in WORKDIR and the flags is mounted with
# gcsfuse at /gcs/BUCKET on every worker and passed to main.py as /gcs/BUCKET/... (orbax writes
# each checkpoint from all hosts together, so the work directory must be shared).
#
# Options (before CONFIG; TPU, ZONE, PROJECT may also come from the environment):
#   --tpu=NAME  --zone=ZONE  --project=PROJECT (default: gcloud's)
#   --accelerator=TYPE   used when the TPU VM does not exist yet (default v4-8)
#   --runtime=VERSION    its software version (default tpu-ubuntu2204-base)
#   --spot               create it as a Spot VM
#   --repo=URL[@REF]     clone this git repository on the workers instead of copying this tree
#   --dry-run            print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: launch/tpu_pod.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P] [--accelerator=v4-8] [--runtime=V] [--spot] [--repo=URL[@REF]] CONFIG WORKDIR [main.py flags...]"
dry_run=false tpu=${TPU:-} zone=${ZONE:-} project=${PROJECT:-} accelerator=v4-8
runtime=tpu-ubuntu2204-base spot=() repo=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=true ;;
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --runtime=*) runtime=${1#*=} ;;
    --spot) spot=(--spot) ;;
    --repo=*) repo=${1#*=} ;;
    *) echo "unknown option $1; $usage" >&2; exit 2 ;;
  esac
  shift
done
: "${tpu:?--tpu=NAME (or TPU) is required}" "${zone:?--zone=ZONE (or ZONE) is required}"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
source launch/lib.sh
remote_dir=d2v-jax
jax_version=$(sed -n 's/^jax==//p' requirements.txt)

# gs://BUCKET/path -> /gcs/BUCKET/path, where the worker setup mounts BUCKET.
buckets=$(printf '%s\n' "$workdir" "$@" | grep -o 'gs://[a-z0-9._-]*' | sed 's|^gs://||' | sort -u |
  tr '\n' ' ' | sed 's/ $//' || true)
workdir=${workdir//gs:\/\//\/gcs\/}
flags=()
for flag in "$@"; do flags+=("${flag//gs:\/\//\/gcs\/}"); done

tpu_vm=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")

# 1. Reuse the TPU VM, or create it.
if $dry_run; then
  echo "$(quote_cmd "${tpu_vm[@]}" describe "$tpu" "${where[@]}") > /dev/null 2>&1 || \\"
  echo "  $(quote_cmd "${tpu_vm[@]}" create "$tpu" "${where[@]}" --accelerator-type="$accelerator" --version="$runtime" "${spot[@]}")"
elif ! "${tpu_vm[@]}" describe "$tpu" "${where[@]}" > /dev/null 2>&1; then
  "${tpu_vm[@]}" create "$tpu" "${where[@]}" --accelerator-type="$accelerator" \
    --version="$runtime" "${spot[@]}"
fi

# 2. The code on every worker: a clone of --repo, or this working tree.
if [[ -n $repo ]]; then
  url=${repo%@*} ref=main
  [[ $repo != *@* ]] || ref=${repo##*@}
  fetch="rm -rf $remote_dir && git clone --quiet $url $remote_dir && git -C $remote_dir checkout --quiet $ref"
else
  run tar czf /tmp/d2v-jax.tgz --exclude=./.venv --exclude=./.git --exclude=./runs .
  run "${tpu_vm[@]}" scp /tmp/d2v-jax.tgz "$tpu":~/ "${where[@]}" --worker=all
  fetch="mkdir -p $remote_dir && tar xzf d2v-jax.tgz -C $remote_dir"
fi

# 3. Set up every worker: Python 3.12 and .venv with jax[tpu], gcsfuse mounts of the buckets.
run "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all \
  --command "$fetch && bash $remote_dir/launch/tpu_worker_setup.sh $jax_version${buckets:+ $buckets}"

# 4. Train: main.py on every worker at once, its output streamed here.
main=(.venv/bin/python main.py --multi_host --config="$config" --workdir="$workdir" "${flags[@]}")
run "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all \
  --command "cd $remote_dir && $(quote_cmd "${main[@]}")"
