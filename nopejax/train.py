"""Entry point: `python -m nopejax.train --config configs/tiny.py --workdir runs/tiny [--config.key=value ...]`.

Thin on purpose: the work happens in loop.run(cfg, workdir), which a notebook can call directly.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/tiny.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the saved config.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Build the model abstractly, print mesh, size and bytes per device, exit.')


def _multi_process() -> bool:
  """True on a pod slice or multi-node job, where jax.distributed must connect the processes."""
  return (',' in os.environ.get('TPU_WORKER_HOSTNAMES', '') or int(os.environ.get('SLURM_NTASKS', '1')) > 1
          or 'JAX_COORDINATOR_ADDRESS' in os.environ)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}; every setting is a --config.key=value flag.')
  import jax  # After flag parsing, so XLA_FLAGS set on the command line's environment apply.
  from nopejax import config, loop
  if _multi_process():
    jax.distributed.initialize()
  cfg = _CONFIG.value
  try:
    if _DRY_RUN.value:
      loop.dry_run(cfg)
      return
    if not _WORKDIR.value:
      raise config.ConfigError('No --workdir given; pass --workdir DIR for checkpoints and metrics.')
    logging.info('Workdir %s', _WORKDIR.value)
    loop.run(cfg, _WORKDIR.value)
  except config.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
