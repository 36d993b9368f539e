"""Tokens/s and MFU of a config's train step on this machine (random tokens, no input pipeline).

  .venv/bin/python bench/train_throughput.py [CONFIG_NAME]     # default: tiny

MFU counts 6 FLOPs per weight and token plus attention's 12 L T D (model.flops_per_token)
against the peak metrics.peak_flops_per_device reports; where it knows none (CPU), against a
measured matmul peak, which the training log does not use (it logs MFU unknown there).
"""
import sys

import jax

import common
from nopejax import metrics, model, sharding

if __name__ == '__main__':
  name = sys.argv[1] if len(sys.argv) > 1 else 'tiny'
  cfg = common.load_config(name)
  peak_per_device = metrics.peak_flops_per_device(cfg)
  if peak_per_device is None:  # Simulated CPU devices share one host: each gets its share.
    peak_per_device = common.measure_matmul_flops(cfg.model.dtype) / jax.local_device_count()
  peak = peak_per_device * jax.device_count()
  seconds = common.time_step(cfg, steps=50)
  tokens_per_sec = cfg.train.batch_size * cfg.data.seq_len / seconds
  mfu = tokens_per_sec * model.flops_per_token(cfg) / peak
  print(f'{name}: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh {sharding.mesh_shape(cfg, jax.device_count())}, '
        f'batch {cfg.train.batch_size} x {cfg.data.seq_len}')
  print(f'median step {seconds * 1000:.1f} ms, {tokens_per_sec:,.0f} tokens/s, '
        f'{model.flops_per_token(cfg) / 1e6:.2f} MFLOP/token, peak {peak / 1e9:.0f} GFLOP/s, MFU {100 * mfu:.1f}%')
