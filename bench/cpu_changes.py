"""What each CPU change buys: nopejax's train step on this CPU with the changes applied
one after another, at vs_torch.py's two shapes, on 1 device and on 8 simulated devices.

  .venv/bin/python bench/cpu_changes.py [--steps 10] [--rows 4,5,6]

Each row adds one change to the row above; the first undoes them all in-process (the projections as
3-D contractions, YNNPACK on every mesh, the optimizer state replicated, attention by xla, glibc's
default malloc), so every row runs the same code. Rows 2 to 5 turn YNNPACK off on 1 device too (by
XLA_FLAGS); the last row gives it back (the code keeps it off on several devices only). One process per
measurement, as vs_torch.py does. Figures: docs/benchmarks.md.
"""
import argparse
import json
import os
import subprocess
import sys

import vs_torch

CHANGES = ('before', '2-D projections (model.project)', 'XLA:CPU without YNNPACK (sharding.compiler_options)',
           'ZeRO-1 optimizer state (mesh.shard_optimizer)', 'chunked attention, 64-token blocks (attention.default_block)',
           'temporaries kept in the heap on 1 device (host.keep_cpu_buffers)',
           'YNNPACK back on 1 device (sharding.compiler_options: several devices only)')
WITHOUT_YNNPACK_ON_ONE_DEVICE = (2, 3, 4, 5)


def measure(shape_index, changes, steps):
  """Runs in the child: seconds per pretrain step with the first `changes` changes applied."""
  sys.path.insert(0, str(vs_torch.ROOT))
  from nopejax import host
  if changes < 5:  # Before bench/common.py's import applies it.
    host.keep_cpu_buffers = lambda: False
  import jax.numpy as jnp
  from nopejax import model, sharding
  if changes < 1:  # The projections as the 3-D contractions they were.
    model.project = lambda x, w: jnp.tensordot(x, w, axes=1)
  if changes < 2:
    sharding.CPU_COMPILER_OPTIONS.clear()
  overrides = []
  if changes < 3:
    overrides.append(('mesh.shard_optimizer', False))
  if changes < 4:
    overrides.append(('model.attention_impl', 'xla'))
  return vs_torch.jax_side(vs_torch.SHAPES[shape_index], steps, False, overrides)['pretrain_s']


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--child', default='')  # "SHAPE,CHANGES": one measurement.
  parser.add_argument('--rows', default='', help='comma-separated row numbers to measure (0 = before); default all')
  args = parser.parse_args()
  if args.child:
    shape_index, changes = map(int, args.child.split(','))
    print(json.dumps(measure(shape_index, changes, args.steps)))
    return
  print('| change (cumulative) | ' + ' | '.join(
      f'{l} x {w}, {b} x {t}, {d}' for l, w, _, t, b in vs_torch.SHAPES for d in ('1 device', '8 devices')) + ' |')
  print('|---|' + '---|' * 4)
  rows = [int(r) for r in args.rows.split(',')] if args.rows else range(len(CHANGES))
  for changes in rows:
    name, cells = CHANGES[changes], []
    for shape_index in range(len(vs_torch.SHAPES)):
      for devices in (1, 8):
        flags = f'--xla_force_host_platform_device_count={devices}'
        if changes in WITHOUT_YNNPACK_ON_ONE_DEVICE:
          flags += ' --xla_cpu_experimental_ynn_fusion_type='  # Dots and reductions to Eigen.
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
        out = subprocess.run([sys.executable, __file__, '--child', f'{shape_index},{changes}', '--steps', str(args.steps)],
                             env=env, check=True, capture_output=True, text=True).stdout
        cells.append(f'{1000 * json.loads(out.strip().splitlines()[-1]):.0f} ms')
    print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
