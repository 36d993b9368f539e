"""The command lines' shared flag: `--config FILE` with `--config.key=value` overrides, parsed so
that bad input ends in one sentence (exit code 2) instead of a traceback; and their shared process
set-up (`keep_cpu_buffers`)."""
import ctypes
import importlib.metadata
import importlib.util
import os

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/tiny.py.', lock_config=True)


def fail(message, code=2):
  from nopejax import config
  config.exit_with_sentence(message, code)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def cpu_only() -> bool:
  """Whether jax will run on the CPU: JAX_PLATFORMS says cpu, or no TPU or GPU plugin is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms == 'cpu'
  plugins = importlib.metadata.entry_points(group='jax_plugins')
  return importlib.util.find_spec('libtpu') is None and not plugins


def _simulated_devices() -> int:
  """The CPU device count XLA_FLAGS asks for (--xla_force_host_platform_device_count; last one wins), 1 if none."""
  count = 1
  for flag in os.environ.get('XLA_FLAGS', '').split():
    if flag.startswith('--xla_force_host_platform_device_count='):
      count = int(flag.split('=', 1)[1])
  return count


def keep_cpu_buffers() -> bool:
  """On the CPU backend only, has glibc keep freed memory for reuse; True if it applied.

  XLA:CPU allocates each step's temporaries (hundreds of MB for the tiny model at 2K tokens) on its
  worker threads and frees them after the step. glibc serves such sizes by a fresh mmap each time
  (a thread's own arena cannot hold more than 64 MB), so every step faulted in every page again:
  47,000 page faults and 85 ms of kernel time per search step (bench/README.md, issue 14). One
  arena, no mmap and no trimming keep the freed buffer in the heap, and the next step reuses it.
  Must run before jax starts its backend (its threads pick their arena on their first malloc).
  Left alone on TPU and GPU hosts, whose host memory (checkpoint buffers, input pipelines) should be
  returned to the system, and with several simulated CPU devices
  (--xla_force_host_platform_device_count), whose threads then queue for the one arena's lock (the
  tiny model's 8-device step went from 250 to 360 ms).
  """
  if not cpu_only() or _simulated_devices() > 1:
    return False
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # Not glibc (macOS): nothing to do.
    return False
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def parse_flags(argv):
  """absl flag parsing, but a bad flag or config override ends in one sentence and exit code 2.

  Also keep_cpu_buffers(), since every command line parses its flags before jax starts.
  """
  from nopejax import config
  keep_cpu_buffers()
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=')[0]
      if not config.is_declared(key):
        fail(f'Unknown config key {key}; every key is declared in configs/base.py, check the spelling there.')
  _check_config_file(argv)
  try:
    argv = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    fail(f'{" ".join(str(e).split())}; check the flag against configs/base.py.')
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
