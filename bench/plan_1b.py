"""The 1B step compiled for TPU slices from this machine (nopejax.plan): compile time by depth with
and without scan over layers, and memory and FLOPs per chip by remat policy.

  .venv/bin/python bench/plan_1b.py compile [TOPOLOGY [LAYERS:scan|LAYERS:unrolled ...]]  # default 4, 11, 22 x both; v5e-256
  .venv/bin/python bench/plan_1b.py remat [TOPOLOGY [POLICY ...]]  # each (or each named) model.remat policy, scan on

One JSON line per compile (nopejax.plan's report plus the settings) on stdout.
"""
import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # libtpu compiles for the slice; no TPU is used.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import common  # noqa: E402
from nopejax import config, plan  # noqa: E402


def report(topology, **settings):
  cfg = common.load_config('1b')
  for key, value in settings.items():
    section, name = key.split('__')
    cfg[section][name] = value
  print(json.dumps({'settings': settings, **plan.plan(cfg, topology)}), flush=True)


if __name__ == '__main__':
  what = sys.argv[1]
  topology = sys.argv[2] if len(sys.argv) > 2 else 'v5e-256'
  if what == 'compile':
    runs = [arg.split(':') for arg in sys.argv[3:]] or [(n, s) for n in (4, 11, 22) for s in ('scan', 'unrolled')]
    for layers, scan in runs:
      report(topology, model__num_layers=int(layers), model__scan_layers=scan == 'scan')
  elif what == 'remat':
    for remat in sys.argv[3:] or config.REMAT:
      report(topology, model__remat=remat)
