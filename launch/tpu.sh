#!/usr/bin/env bash
# Cloud TPU pod slices through queued resources: create, install, train on every worker, follow
# worker 0's log, stop (save and exit), delete. One process per host; they find each other through
# jax's Cloud TPU cluster detection. --dry-run prints the exact gcloud commands instead.
#
#   bash launch/tpu.sh up     --name nope-1b --zone us-east5-a --type v5litepod-256 -- \
#       --config configs/1b.py --workdir gs://BUCKET/runs/nope-1b \
#       --config.data.train_files=gs://BUCKET/tokens/train --config.data.eval_files=gs://BUCKET/tokens/eval \
#       --config.data.tokenizer=gs://BUCKET/llama2.model
#     (token shards from python -m nopejax.prepare, or raw .jsonl.zst / .parquet shards: docs/scaling.md)
#   bash launch/tpu.sh create  --name NAME --zone ZONE --type TYPE [--spot] [--project P] [--runtime VERSION]
#   bash launch/tpu.sh install --name NAME --zone ZONE [--branch B]        (NOPEJAX_REPO, below, and its pins)
#   bash launch/tpu.sh train   --name NAME --zone ZONE -- TRAIN FLAGS      (the same command on all workers)
#   bash launch/tpu.sh logs    --name NAME --zone ZONE                     (worker 0's log, followed)
#   bash launch/tpu.sh stop    --name NAME --zone ZONE                     (SIGTERM: finish the step, save, exit)
#   bash launch/tpu.sh delete  --name NAME --zone ZONE                     (the slice and its queued resource)
#
# `up` is create + install + train + logs. Run `train` again after a preemption: it resumes from the
# workdir's latest checkpoint.
#
# NOPEJAX_REPO is the nopejax every worker installs (pip install -e '.[tpu,files]' in ~/nopejax): a local
# git checkout, by default the one this script is in, whose files (tracked and untracked, not ignored)
# are copied to the workers; or a git URL the workers clone (--branch B picks a branch).
set -euo pipefail

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2; }

command=${1:-}
[[ -z "$command" || "$command" == -h || "$command" == --help ]] && usage
shift
name= zone= type=v5litepod-256 runtime= project= spot= dry_run=
repo=${NOPEJAX_REPO:-$(cd "$(dirname "$0")/.." && pwd)} branch=
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
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
  local fetch
  if [[ -d "$repo" ]]; then  # A local checkout: its files, packed here and unpacked on every worker.
    git -C "$repo" rev-parse --git-dir > /dev/null 2>&1 ||
      { echo "error: NOPEJAX_REPO=$repo is not a git checkout; set it to one, or to a git URL" >&2; exit 2; }
    local archive="${TMPDIR:-/tmp}/nopejax-$name.tar.gz"
    local pack='set -o pipefail; cd "$1" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d "" f; do [[ ! -e "$f" ]] || printf "%s\0" "$f"; done | tar -czf "$2" --null -T -'
    run bash -c "$pack" pack "$repo" "$archive"
    run gcloud compute tpus tpu-vm scp "$archive" "$name:nopejax.tar.gz" --zone "$zone" "${project_flag[@]}" --worker=all
    fetch="mkdir -p nopejax && tar -xzf nopejax.tar.gz -C nopejax"
  elif [[ "$repo" == *:* ]]; then  # A git URL: cloned on every worker, then brought up to date.
    fetch="{ test -d nopejax || git clone -q $(quote "$repo") nopejax; }"
    [[ -z "$branch" ]] || fetch+=" && git -C nopejax fetch -q origin $(quote "$branch") && git -C nopejax checkout -q $(quote "$branch")"
    fetch+=" && git -C nopejax pull -q --ff-only"
  else
    echo "error: NOPEJAX_REPO=$repo is neither a folder here nor a git URL; set it to a checkout of nopejax or its URL" >&2
    exit 2
  fi
  # The images ship Python 3.10 (Ubuntu 22.04); the pinned stack needs 3.12, from the deadsnakes PPA
  # where the release has none. A .venv of another Python is made anew (its pip would refuse the pins).
  on_workers all "sudo apt-get -qq update && { apt-cache show python3.12-venv > /dev/null 2>&1 \
|| sudo add-apt-repository -y ppa:deadsnakes/ppa > /dev/null; } && sudo apt-get -qq install -y python3.12 python3.12-venv git \
&& $fetch && cd nopejax && { test -x .venv/bin/python3.12 || { rm -rf .venv && python3.12 -m venv .venv; }; } \
&& .venv/bin/pip install -q --upgrade pip \
&& .venv/bin/pip install -q -e '.[tpu,files]'"
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
