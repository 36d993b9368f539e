"""Process set-up for the command lines: memory reuse on the CPU (before jax starts its backend) and a
quiet log."""
import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import sys

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

  XLA:CPU allocates each step's temporaries on its worker threads and frees them after the step.
  glibc serves such sizes by a fresh mmap each time (a thread's own arena cannot hold more than
  64 MB), so every step would fault in every page again. One arena, no mmap and no trimming keep the
  freed buffer in the heap, and the next step reuses it. Must run before jax starts its backend (its
  threads pick their arena on their first malloc). Left alone on TPU and GPU hosts, whose host memory
  (checkpoint buffers, input pipelines) should be returned to the system, and with several simulated
  CPU devices (--xla_force_host_platform_device_count), whose threads would then queue for the one
  arena's lock.
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


_NOISY_LIBRARIES = ('orbax', 'grain', 'jax', 'tensorflow_datasets')


class _QuietLibraries(logging.Filter):
  """Drops the INFO lines of the libraries above (one per file read or written); keeps their warnings."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(f'/{lib}/' in record.pathname for lib in _NOISY_LIBRARIES)


def quiet_libraries() -> None:
  """Keeps orbax's, grain's, jax's and tfds's per-file INFO lines out of the progress log (absl's handler)."""
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull')


def parse_command_flags(argv, hint, errors=(AttributeError, KeyError, ValueError, TypeError, SyntaxError)):
  """flags.FLAGS(argv) for a command line: `--help` prints the usage and exits 0 (absl exits 1), a
  bad flag ends in one sentence ending with `hint` and exit code 2.

  Also keep_cpu_buffers(), since every command line parses its flags before jax starts.
  """
  from absl import flags
  from nopejax import config
  keep_cpu_buffers()
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    try:
      flags.FLAGS(argv)  # absl's help flag prints the usage, then exits 1.
    except SystemExit:
      pass
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *errors) as e:
    config.exit_with_sentence(f'{" ".join(str(e).split())}; {hint}')
