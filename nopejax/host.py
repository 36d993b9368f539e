"""Process set-up for the host the step runs on, done before jax starts its backend."""
import ctypes
import importlib.metadata
import importlib.util
import os

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
