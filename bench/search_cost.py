"""Search step vs pretrain step at the same shape: time per step and XLA's per-device memory.

  .venv/bin/python bench/search_cost.py            # tiny_search shape (8 x 256), timed and sized
  .venv/bin/python bench/search_cost.py --big      # also 1b_search's shape (8 x 8192), sized only

The search differentiates only the temperatures: no weight gradients, no optimizer state for
weights. Timing runs on this machine's CPU with 8 simulated devices; memory is XLA's buffer
assignment for one device (compiled ahead of time on abstract arrays, so 1B fits on a laptop).
"""
import sys

import jax

import common
from nopejax import sharding


def compare(name, timed):
  rows = []
  for trainable in ('model', 'temperature'):
    cfg = common.load_config(name)
    cfg.train.trainable = trainable
    cfg.search.base = ''
    _, compiled, _, _ = common.compiled_step(cfg)
    memory = common.memory_bytes(compiled)
    seconds = common.time_step(cfg) if timed else float('nan')
    rows.append((trainable, seconds, memory))
  print(f'\n{name}: batch {cfg.train.batch_size} x length {cfg.data.seq_len}, '
        f'{cfg.model.num_layers} layers, width {cfg.model.embed_dim}, mesh {sharding.mesh_shape(cfg, jax.device_count())}')
  print('| step | s/step | temp MiB | argument MiB | output MiB |')
  print('|---|---|---|---|---|')
  for trainable, seconds, memory in rows:
    label = 'pretrain (weights train)' if trainable == 'model' else 'search (temperatures train)'
    print(f'| {label} | {seconds:.4f} | {memory["temp"] / 2**20:,.1f} | {memory["argument"] / 2**20:,.1f} '
          f'| {memory["output"] / 2**20:,.1f} |')
  (_, pre_s, pre_m), (_, search_s, search_m) = rows
  if timed:
    print(f'search / pretrain time per step: {search_s / pre_s:.2f}')
  print(f'search / pretrain temp memory: {search_m["temp"] / pre_m["temp"]:.2f}, '
        f'argument memory: {search_m["argument"] / pre_m["argument"]:.2f}')


if __name__ == '__main__':
  compare('tiny_search', timed=True)
  if '--big' in sys.argv:
    compare('1b_search', timed=False)
