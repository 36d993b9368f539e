"""The command line: `python -m nopejax.evaluate --workdir DIR` or `--compare DIR ... --out OUT` (see
the package docstring). Flags are defined only when this module runs as the program, so importing
the package (tests, notebooks, nopejax.train in the same process) defines none."""
import logging as logging_std
import sys

from absl import logging

from nopejax import config
from nopejax.config import ConfigError
from nopejax.evaluate import report, workdir


def _fail(message, code=2):
  config.exit_with_sentence(message, code)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  from configs import base
  config_flags.DEFINE_config_dict(
      'config', base.get_config(),
      'Overrides of the run\'s saved config: eval.*, model.temperature, data.* corpus keys.',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'The run to evaluate (a pretraining or search workdir).')
  flags.DEFINE_bool('compare', False, 'Compare evaluated runs: their directories follow as arguments.')
  flags.DEFINE_string('out', None, 'Output directory (default WORKDIR/eval, WORKDIR/eval_cX with a temperature, '
                      'or eval_compare with --compare).')


def _override_keys(argv) -> list[str]:
  return [arg[len('--config.'):].split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]


def _parse_flags(argv):
  """absl flag parsing; a bad flag or override ends in one sentence and exit code 2."""
  from absl import flags
  from nopejax import host
  host.keep_cpu_buffers()  # Before jax starts.
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, SyntaxError) as e:
    _fail(f'{" ".join(str(e).split())}; check the flag against configs/base.py.')


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's, grain's and tfds's per-file INFO lines out of the progress log."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'jax', 'tensorflow_datasets'))


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    if FLAGS.compare:
      if FLAGS.workdir or _override_keys(sys.argv):
        raise ConfigError('--compare reads finished evaluations; drop --workdir and --config.* or run them separately.')
      report.compare(argv[1:], FLAGS.out or 'eval_compare')
      return
    if len(argv) > 1:
      raise ConfigError(f'Unexpected arguments {argv[1:]}; every setting is a --config.key=value flag '
                        '(or use --compare DIR ...).')
    if not FLAGS.workdir:
      raise ConfigError('No --workdir given; pass --workdir DIR of a trained run (or --compare DIR ...).')
    overrides = {}
    for key in _override_keys(sys.argv):
      node = FLAGS.config
      for name in key.split('.'):
        node = node[name]
      overrides[key] = node
    workdir.evaluate(FLAGS.workdir, overrides, FLAGS.out)
  except ConfigError as e:
    _fail(str(e))


def _check_override_keys(argv) -> None:
  # Before the flags exist: config_flags reads the overrides from sys.argv when defining them.
  for key in _override_keys(argv):
    if not config.is_declared(key):
      _fail(f'Unknown config key {key}; every key is declared in configs/base.py, check the spelling there.')


if __name__ == '__main__':
  from absl import app
  _check_override_keys(sys.argv)
  try:
    _define_flags()
  except Exception as e:  # config_flags parses the overrides' types here.
    _fail(f'{" ".join(str(e).split())}; check the --config.* flags against configs/base.py.')
  app.run(main, flags_parser=_parse_flags)
