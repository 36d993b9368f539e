"""nopejax.host: glibc keeps the CPU step's freed buffers for the next step (keep_cpu_buffers); the
libraries' per-file INFO lines stay out of the log (quiet_libraries)."""
import logging
import subprocess
import sys

import pytest
from absl import logging as absl_logging

from nopejax import host

# A fresh process, so that the setting cannot leak into the test session; its last line says whether
# the step's buffers came back from the heap (few page faults per step) or fresh from the system.
_PROBE = '''
import ctypes, resource, threading
from nopejax import host
applied = host.keep_cpu_buffers()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 * 2**20  # Allocated, written and freed on a worker thread, as XLA:CPU does a step's temporaries.
def step():
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)
  libc.free(ctypes.c_void_p(buffer))
def run(steps):
  thread = threading.Thread(target=lambda: [step() for _ in range(steps)])
  thread.start()
  thread.join()
run(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run(5)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
'''


def probe(env):
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True, check=True)
  applied, faults = out.stdout.split()[-2:]
  return applied == 'True', int(faults)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='mallopt is glibc (Linux) only')
def test_cpu_buffers_are_reused_instead_of_faulted_in_again(monkeypatch):
  base = {'PATH': '/usr/bin:/bin', 'PYTHONPATH': ':'.join(sys.path)}
  applied, faults = probe(dict(base, JAX_PLATFORMS='cpu'))
  assert applied
  assert faults < 1000, faults  # 64 MB are 16,384 pages: none faulted again.
  # Several simulated devices, or an accelerator: glibc is left as it is, and every 64 MB faults in again.
  applied, faults = probe(dict(base, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert not applied and faults > 10_000, faults
  applied, _ = probe(dict(base, JAX_PLATFORMS='tpu'))
  assert not applied


def test_cpu_only_reads_jax_platforms(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host.cpu_only()
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu,cpu')
  assert not host.cpu_only()


def test_quiet_libraries_drops_their_info_lines_once_installed():
  handler = absl_logging.get_absl_handler()
  before = list(handler.filters)
  try:
    host.quiet_libraries()
    host.quiet_libraries()
    added = [f for f in handler.filters if f not in before]
    assert len(added) == 1

    def passes(pathname, level):
      return handler.filter(logging.LogRecord('x', level, pathname, 1, 'message', None, None))

    assert not passes('/venv/site-packages/orbax/checkpoint/io.py', logging.INFO)
    assert not passes('/venv/site-packages/grain/_src/reader.py', logging.INFO)
    assert passes('/venv/site-packages/orbax/checkpoint/io.py', logging.WARNING)
    assert passes('/work/nopejax/metrics.py', logging.INFO)
  finally:
    for f in handler.filters[:]:
      if f not in before:
        handler.removeFilter(f)
