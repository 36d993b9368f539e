"""Entry point: `python -m nopejax.train --config configs/tiny.py --workdir runs/tiny [--config.key=value ...]`.

Thin on purpose: the work happens in loop.run(cfg, workdir), which a notebook can call directly.
On a pod slice or cluster the processes join by themselves (jax's cluster detection: Cloud TPU,
SLURM, Open MPI, Kubernetes), or by hand on any machines:

  python -m nopejax.train ... --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
"""
import logging as logging_std
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/tiny.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the saved config.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Build the model abstractly, print mesh, size and bytes per device, exit.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, to join processes by hand (with --num_processes, --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes of the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes - 1.')


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's and grain's per-file INFO lines out of the progress log."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'jax', 'tensorflow_datasets'))


def _parse_flags(argv):
  """absl flag parsing, but a bad flag or config override ends in one sentence and exit code 2."""
  from nopejax import config
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=')[0]
      if not config.is_declared(key):
        _fail(f'Unknown config key {key}; every key is declared in configs/base.py, check the spelling there.')
  try:
    argv = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    _fail(f'{" ".join(str(e).split())}; check the flag against configs/base.py.')
  if _CONFIG.value is None:
    _fail('No --config given; pass one, e.g. --config configs/tiny.py.')
  try:
    _CONFIG.value.keys()  # config_flags loads the file lazily; make a missing file fail here.
  except OSError:
    _fail(f'Cannot load the config file {flags.FLAGS["config"].config_filename}; pass an existing file such as configs/tiny.py.')
  return argv


def _fail(message, code=2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}; every setting is a --config.key=value flag.')
  from nopejax import config, loop, sharding  # After flag parsing, so XLA_FLAGS set in the environment apply.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  cfg = _CONFIG.value
  try:
    sharding.join_processes(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DRY_RUN.value:
      loop.dry_run(cfg)
      return
    if not _WORKDIR.value:
      raise config.ConfigError('No --workdir given; pass --workdir DIR for checkpoints and metrics.')
    logging.info('Workdir %s', _WORKDIR.value)
    loop.run(cfg, _WORKDIR.value)
  except config.ConfigError as e:
    _fail(str(e))
  except FloatingPointError as e:
    _fail(str(e), code=1)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
