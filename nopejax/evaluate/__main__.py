"""The command line: `python -m nopejax.evaluate --workdir DIR` or `--compare DIR ... --out OUT` (see
the package docstring). Flags are defined only when this module runs as the program, so importing
the package (tests, notebooks, nopejax.train in the same process) defines none."""
import sys

from nopejax import checkpoint, config, host
from nopejax.config import ConfigError
from nopejax.evaluate import report, workdir


def _fail(message, code=2):
  config.exit_with_sentence(message, code)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_dict(
      'config', config.get_config(),
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
  return host.parse_command_flags(argv, 'check the flag against nopejax/defaults.py.')


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  host.quiet_libraries()
  try:
    if FLAGS.compare:
      if FLAGS.workdir or _override_keys(sys.argv):
        raise ConfigError('--compare reads finished evaluations; drop --workdir and --config.* or run them separately.')
      checkpoint.check_writable(FLAGS.out or 'eval_compare', '--out')
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
  except Exception as e:  # A write the disk refused (full, read-only) at the end: one sentence.
    code = checkpoint.disk.refused(e)
    if code is None:
      raise
    _fail(checkpoint.disk.sentence(FLAGS.out or 'the output directory', code, '--out'))


def _check_override_keys(argv) -> None:
  # Before the flags exist: config_flags reads the overrides from sys.argv when defining them.
  for key in _override_keys(argv):
    if not config.is_declared(key):
      _fail(f'Unknown config key {key}; every key is declared in nopejax/defaults.py, check the spelling there.')


if __name__ == '__main__':
  from absl import app
  _check_override_keys(sys.argv)
  try:
    _define_flags()
  except Exception as e:  # config_flags parses the overrides' types here.
    _fail(f'{" ".join(str(e).split())}; check the --config.* flags against nopejax/defaults.py.')
  app.run(main, flags_parser=_parse_flags)
