#!/usr/bin/env bash
# Runs on every worker of a TPU VM (launch/tpu_pod.sh calls it through `ssh --worker=all`):
# Python 3.12 (uv's, when the image has none), .venv with jax[tpu], and a gcsfuse mount of each
# bucket at /gcs/BUCKET.
#
#   bash d2v-jax/launch/tpu_worker_setup.sh JAX_VERSION [BUCKET ...]
set -euo pipefail
cd "$(dirname "$0")/.."
jax_version=${1:?usage: tpu_worker_setup.sh JAX_VERSION [BUCKET ...]}
shift

if ! command -v python3.12 > /dev/null; then
  [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
  ~/.local/bin/uv python install 3.12
  export PYTHON=$(~/.local/bin/uv python find 3.12)
fi
bash launch/setup.sh
.venv/bin/pip install --quiet "jax[tpu]==$jax_version"

if [ $# -gt 0 ] && ! command -v gcsfuse > /dev/null; then
  # https://cloud.google.com/storage/docs/cloud-storage-fuse/install
  repo="gcsfuse-$(lsb_release -c -s)"
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
  curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
for bucket in "$@"; do
  sudo mkdir -p "/gcs/$bucket" && sudo chown "$USER" "/gcs/$bucket"
  # orbax renames a finished checkpoint's temporary directory: allow directory renames.
  mountpoint -q "/gcs/$bucket" ||
    gcsfuse --implicit-dirs --rename-dir-limit=1000000 "$bucket" "/gcs/$bucket"
done
echo "worker $(hostname): ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
