#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all of its GPUs.
# jax.distributed.initialize() reads the SLURM environment (SLURM_NTASKS > 1).
#
#   sbatch --nodes=4 launch/gpu_slurm.sh --config configs/1b.py --workdir /shared/runs/nope-1b \
#       --config.data.text_dir=/shared/data/slimpajama_starcoder --config.data.tokenizer=/shared/llama2.model
#
# Install once on shared storage: python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt 'jax[cuda13]==0.10.2'
#SBATCH --job-name=nopejax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# cuDNN's fused attention: --config.model.attention_impl=cudnn (untested here: no GPU in CI).
srun .venv/bin/python -m nopejax.train "$@"
