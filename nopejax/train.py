"""Entry point: `python -m nopejax.train --config configs/tiny.py --workdir runs/tiny [--config.key=value ...]`.

Thin on purpose: the work happens in loop.run(cfg, workdir), which a notebook can call directly.
On a pod slice or cluster the processes join by themselves (jax's cluster detection: Cloud TPU,
SLURM, Open MPI, Kubernetes), or by hand on any machines:

  python -m nopejax.train ... --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
"""
from absl import app, flags, logging

from nopejax import cli, host

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the saved config.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Build the model abstractly, print mesh, size and bytes per device, exit.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, to join processes by hand (with --num_processes, --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes of the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes - 1.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments {argv[1:]}; every setting is a --config.key=value flag.')
  from nopejax import config, loop, sharding  # After flag parsing, so XLA_FLAGS set in the environment apply.
  host.quiet_libraries()
  cfg = cli.CONFIG.value
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
    cli.fail(str(e))
  except FloatingPointError as e:
    cli.fail(str(e), code=1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
