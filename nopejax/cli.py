"""The command lines' shared flag: `--config FILE` with `--config.key=value` overrides, parsed so
that bad input ends in one sentence (exit code 2) instead of a traceback."""
import os

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/tiny.py.', lock_config=True)


def fail(message, code=2):
  from nopejax import config
  config.exit_with_sentence(message, code)


def parse_flags(argv):
  """parse_command_flags for the commands that take `--config`: an unknown key, a config file that
  fails or a missing `--config` is one sentence and exit code 2."""
  from nopejax import config, host
  if any(arg in host.HELP_FLAGS for arg in argv[1:]):
    return host.parse_command_flags(argv, '')
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=')[0]
      if not config.is_declared(key):
        fail(f'Unknown config key {key}; every key is declared in nopejax/defaults.py, check the spelling there.')
  _check_config_file(argv)
  argv = host.parse_command_flags(argv, 'check the flag against nopejax/defaults.py.')
  if CONFIG.value is None:
    fail('No --config given; pass one, e.g. --config configs/tiny.py.')
  try:
    CONFIG.value.keys()  # config_flags loads the file lazily; make a missing file fail here.
  except OSError:
    fail(f'Cannot load the config file {flags.FLAGS["config"].config_filename}; pass an existing file such as configs/tiny.py.')
  return argv


def _check_config_file(argv) -> None:
  """Runs the --config file's get_config() once, so a syntax error or a failing get_config() is one
  sentence instead of config_flags' traceback."""
  from nopejax import config
  for i, arg in enumerate(argv[1:], 1):
    path = arg.split('=', 1)[1] if arg.startswith('--config=') else argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None
    if path and os.path.isfile(path):
      try:
        config.from_file(path)
      except Exception as e:  # Whatever the file raises.
        where, detail = (f' at line {e.lineno}', e.msg) if isinstance(e, SyntaxError) else ('', str(e))
        fail(f'The config file {path} fails{where} ({type(e).__name__}: {" ".join(detail.split())[:200]}); '
             'fix it so that its get_config() returns the config.')
