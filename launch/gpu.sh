#!/usr/bin/env bash
# GPU nodes: install, then train under SLURM or on plain machines. --dry-run prints the exact
# commands (and the batch script) instead of running them.
#
#   bash launch/gpu.sh install                     (in the repository, on storage every node sees: .venv with
#       pip install -e '.[cuda,files]', the pins of pyproject.toml and jax's CUDA 13 build; Python 3.12:
#       python3.12 on PATH, or PYTHON=/path/to/python3.12)
#   bash launch/gpu.sh slurm --nodes 2 [--gpus-per-node 8] [--partition P] [--time 7-00:00:00] -- TRAIN FLAGS
#       One process per GPU: jax's SLURM detection joins them and gives each its GPU.
#   COORDINATOR=node0:12345 NUM_NODES=2 NODE_RANK=0 bash launch/gpu.sh node -- TRAIN FLAGS
#       Plain multi-node: run on every node (NODE_RANK 0 .. NUM_NODES - 1), one process per node with
#       all its GPUs; COORDINATOR is node 0's address and a free port.
#
# TRAIN FLAGS, e.g.: --config configs/1b.py --workdir /shared/runs/nope-1b
#     --config.data.train_files=/shared/tokens/train --config.data.eval_files=/shared/tokens/eval
#     --config.data.tokenizer=/shared/llama2.model   (token shards from python -m nopejax.prepare,
#     or raw .jsonl.zst / .parquet shards: docs/scaling.md)
# SIGTERM (scancel, or kill on a node) makes every process finish its step, save and exit; run the
# same command again to resume.
set -euo pipefail

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2; }

command=${1:-}
[[ -z "$command" || "$command" == -h || "$command" == --help ]] && usage
shift
nodes= gpus_per_node=8 partition= time_limit= dry_run=
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus_per_node=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --time) time_limit=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; train_args=("$@"); break ;;
    *) echo "error: unknown option $1; see bash $0 --help" >&2; exit 2 ;;
  esac
done

# quote, run (prints each command, runs it unless --dry-run).
source "$(dirname "$0")/common.sh"

need_train_args() {
  [[ ${#train_args[@]} -gt 0 ]] || { echo "error: pass the training flags after --, e.g. -- --config configs/1b.py --workdir /shared/runs/nope-1b" >&2; exit 2; }
}

case "$command" in
  install)
    # A .venv of another Python than 3.12 is made anew (its pip would refuse the pins).
    if [[ ! -x .venv/bin/python3.12 ]]; then
      [[ ! -d .venv ]] || run rm -rf .venv
      run "${PYTHON:-python3.12}" -m venv .venv
    fi
    run .venv/bin/pip install -q -e '.[cuda,files]'
    ;;
  slurm)
    need_train_args
    [[ -n "$nodes" ]] || { echo "error: --nodes is required for slurm, e.g. --nodes 2" >&2; exit 2; }
    script="#!/usr/bin/env bash
#SBATCH --job-name=nopejax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus_per_node
#SBATCH --gpus-per-node=$gpus_per_node
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --output=nopejax-%j.log${partition:+
#SBATCH --partition=$partition}${time_limit:+
#SBATCH --time=$time_limit}
cd $(quote "$PWD")
exec srun --kill-on-bad-exit=1 .venv/bin/python -m nopejax.train $(quote "${train_args[@]}")"
    echo "sbatch <<'EOF'"
    echo "$script"
    echo "EOF"
    [[ -n "$dry_run" ]] || sbatch <<< "$script"
    ;;
  node)
    need_train_args
    if [[ -z "${COORDINATOR:-}" || -z "${NUM_NODES:-}" || -z "${NODE_RANK:-}" ]]; then
      echo "error: set COORDINATOR (host:port of node 0), NUM_NODES and NODE_RANK (0 .. NUM_NODES - 1) for node" >&2
      exit 2
    fi
    run .venv/bin/python -m nopejax.train "${train_args[@]}" --coordinator_address="$COORDINATOR" \
      --num_processes="$NUM_NODES" --process_id="$NODE_RANK"
    ;;
  *) echo "error: unknown command $command; use install, slurm or node" >&2; exit 2 ;;
esac
