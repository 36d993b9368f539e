"""Test setup: 8 simulated CPU devices, so every sharding path runs without an accelerator."""
import os

# Must happen before jax initializes its backends.
os.environ['XLA_FLAGS'] = ' '.join([
    os.environ.get('XLA_FLAGS', ''),
    '--xla_force_host_platform_device_count=8',
    # A collective that hangs fails the test in 30 s instead of blocking the suite.
    '--xla_cpu_collective_call_terminate_timeout_seconds=30',
])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """One prepared copy of the bundled corpus shared by every test in the session."""
  return str(tmp_path_factory.mktemp('tfds'))
