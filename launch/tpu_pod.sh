#!/usr/bin/env bash
# Run nopejax on every worker of a Cloud TPU VM slice (one process per host; jax.distributed
# connects them because TPU_WORKER_HOSTNAMES lists more than one host).
#
#   TPU=my-v4-64 ZONE=us-central2-b bash launch/tpu_pod.sh \
#       --config configs/1b.py --workdir gs://BUCKET/runs/nope-1b \
#       --config.data.text_dir=/data/slimpajama_starcoder --config.data.tokenizer=/data/llama2.model
#
# Create the slice first, e.g.:
#   gcloud compute tpus queued-resources create nope-1b --node-id "$TPU" --zone "$ZONE" \
#       --accelerator-type v4-64 --runtime-version tpu-ubuntu2204-base
# Data: each host reads only its shard, from a path every host can read (a copy on each host's
# disk, or a mounted bucket); set --config.data.tfds_dir to shared storage to prepare it once.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-https://github.com/OWNER/nopejax.git}
BRANCH=${BRANCH:-main}
ARGS=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  test -d nopejax || git clone -b $BRANCH $REPO nopejax
  cd nopejax && git pull --ff-only
  test -d .venv || python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'
  nohup .venv/bin/python -m nopejax.train $ARGS > train.log 2>&1 &
"
echo "Started on every worker of $TPU; logs: gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=0 --command 'tail -f nopejax/train.log'"
