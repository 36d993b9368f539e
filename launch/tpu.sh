#!/usr/bin/env bash
# Cloud TPU pod slices through queued resources: create, install, train on every worker, follow
# worker 0's log, stop (save and exit), delete. One process per host; they find each other through
# jax's Cloud TPU cluster detection. --dry-run prints the exact gcloud commands instead.
#
#   bash launch/tpu.sh up     --name nope-1b --zone us-east5-a --type v5litepod-256 -- \
#       --config configs/1b.py --workdir gs://BUCKET/runs/nope-1b \
#       --config.data.text_dir=gs://BUCKET/data/slimpajama_starcoder --config.data.tokenizer=gs://BUCKET/llama2.model
#   bash launch/tpu.sh create  --name NAME --zone ZONE --type TYPE [--spot] [--project P] [--runtime VERSION]
#   bash launch/tpu.sh install --name NAME --zone ZONE [--repo URL] [--branch B]
#   bash launch/tpu.sh train   --name NAME --zone ZONE -- TRAIN FLAGS      (the same command on all workers)
#   bash launch/tpu.sh logs    --name NAME --zone ZONE                     (worker 0's log, followed)
#   bash launch/tpu.sh stop    --name NAME --zone ZONE                     (SIGTERM: finish the step, save, exit)
#   bash launch/tpu.sh delete  --name NAME --zone ZONE                     (the slice and its queued resource)
#
# `up` is create + install + train + logs. Run `train` again after a preemption: it resumes from the
# workdir's latest checkpoint.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

command=${1:-}
[[ -z "$command" || "$command" == -h || "$command" == --help ]] && usage
shift
name= zone= type=v5litepod-256 runtime= project= spot= dry_run=
repo=${REPO:-https://github.com/OWNER/nopejax.git} branch=${BRANCH:-main}
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --branch) branch=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; train_args=("$@"); break ;;
    *) echo "error: unknown option $1; see bash $0 --help" >&2; exit 2 ;;
  esac
done
[[ -n "$name" && -n "$zone" ]] || { echo "error: --name and --zone are required; see bash $0 --help" >&2; exit 2; }
if [[ -z "$runtime" ]]; then
  case "$type" in
    v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) runtime=tpu-ubuntu2204-base ;;
  esac
fi
project_flag=()
[[ -n "$project" ]] && project_flag=(--project "$project")

# quote, run (prints each command, runs it unless --dry-run).
source "$(dirname "$0")/common.sh"

on_workers() {  # on_workers WORKER 'remote shell command'
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_flag[@]}" --worker="$1" --command "$2"
}

create() {
  run gcloud compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" "${project_flag[@]}" \
    --accelerator-type "$type" --runtime-version "$runtime" ${spot:+--spot}
  if [[ -z "$dry_run" ]]; then  # Queued resources wait for capacity: poll until the slice is up.
    until [[ "$(gcloud compute tpus queued-resources describe "$name" --zone "$zone" "${project_flag[@]}" \
                --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
  fi
}

install() {
  # The images ship Python 3.10; the pinned stack needs 3.11.
  on_workers all "sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv git \
&& { test -d nopejax || git clone -q -b $branch $repo nopejax; } \
&& cd nopejax && git fetch -q origin $branch && git checkout -q $branch && git pull -q --ff-only \
&& { test -d .venv || python3.11 -m venv .venv; } \
&& .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
}

train() {
  [[ ${#train_args[@]} -gt 0 ]] || { echo "error: pass the training flags after --, e.g. -- --config configs/1b.py --workdir gs://BUCKET/run" >&2; exit 2; }
  local quoted
  quoted=$(quote "${train_args[@]}")
  # setsid + nohup: training outlives the ssh session; train.pid is what `stop` signals.
  on_workers all "cd nopejax && { setsid nohup .venv/bin/python -m nopejax.train $quoted > train.log 2>&1 < /dev/null & echo \$! > train.pid; }"
}

logs() { on_workers 0 "tail -n +1 -F nopejax/train.log"; }
stop() { on_workers all "kill -TERM \$(cat nopejax/train.pid)"; }
delete() { run gcloud compute tpus queued-resources delete "$name" --zone "$zone" "${project_flag[@]}" --force --quiet; }

case "$command" in
  create) create ;;
  install) install ;;
  train) train ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  up) create; install; train; logs ;;
  *) echo "error: unknown command $command; use create, install, train, logs, stop, delete or up" >&2; exit 2 ;;
esac
