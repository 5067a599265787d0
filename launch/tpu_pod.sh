#!/usr/bin/env bash
# Cloud TPU VM or pod slice: copy the repository to every worker, set up, and start one process
# per host. jax.distributed.initialize() discovers the other hosts on TPU VMs by itself.
#
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh configs/audio.py:variant=base \
#       gs://bucket/runs/audio_base --config.input.source=tfds --config.input.path=librispeech
#
# The work directory must be reachable from every host (a GCS bucket, or a shared filesystem):
# orbax writes one checkpoint from all hosts together.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [flags...]}
shift 2
remote_dir=d2v-jax
tar czf /tmp/d2v-jax.tgz --exclude=.venv --exclude=.git --exclude=runs .
gcloud compute tpus tpu-vm scp /tmp/d2v-jax.tgz "$TPU":~/ --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p $remote_dir && tar xzf d2v-jax.tgz -C $remote_dir && cd $remote_dir
  bash launch/setup.sh && .venv/bin/pip install --quiet 'jax[tpu]==0.12.0.1'
  .venv/bin/python main.py --multi_host --config='$config' --workdir='$workdir' $*"
