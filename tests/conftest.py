"""Test setup: 8 simulated CPU devices, so every sharding path runs without an accelerator."""
import hashlib
import os

# Must happen before jax initializes its backends.
os.environ['XLA_FLAGS'] = ' '.join([
    os.environ.get('XLA_FLAGS', ''),
    '--xla_force_host_platform_device_count=8',
    # A collective that hangs fails the test in 30 s instead of blocking the suite.
    '--xla_cpu_collective_call_terminate_timeout_seconds=30',
])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# The CPU backend only: libtpu (installed for the TPU compile tests) would otherwise probe for a TPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # Several processes may compile for TPU at once.
# One persistent compilation cache for the whole run: the pytest-xdist workers and the commands the
# tests start as processes inherit it, so a program compiled once (the small model's train step, say,
# which every loop.run compiles anew) is read back instead of compiled again. A cache hit is the same
# executable, so no result changes. The directory is this run's own (a fresh clone compiles as CI does)
# and goes when the run ends; a size limit makes jax lock the entries it writes and reads concurrently.
# Only compiles of over a second are written (jax's default): the many small ones of eager code would
# cost more to write than to compile.
_JAX_CACHE_CREATED = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile
  _JAX_CACHE_CREATED = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='nopejax-test-jax-cache-')
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))

import pytest  # noqa: E402


def pytest_unconfigure(config):
  """The process that made the compilation cache (pytest's main one) removes it at the end."""
  if _JAX_CACHE_CREATED:
    import shutil
    shutil.rmtree(_JAX_CACHE_CREATED, ignore_errors=True)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """One prepared copy of the bundled corpus shared by every test in the session."""
  return str(tmp_path_factory.mktemp('tfds'))


def small_config(tfds_dir=None):
  """A model small enough to compile and step in seconds, with dims that divide every test mesh."""
  from nopejax import config
  cfg = config.get_config()
  cfg.model.num_layers = 2
  cfg.model.embed_dim = 64
  cfg.model.num_heads = 4
  cfg.model.num_kv_heads = 2
  cfg.model.mlp_dim = 128
  cfg.data.seq_len = 16
  cfg.train.batch_size = 8
  cfg.train.steps = 40
  cfg.train.warmup_steps = 5
  cfg.train.log_every = 1
  cfg.train.eval_every = 0
  cfg.train.eval_batches = 2
  cfg.train.checkpoint_every = 10
  cfg.train.peak_flops_per_device = 1e9  # A known peak, so the logs carry an MFU.
  if tfds_dir:
    cfg.data.tfds_dir = tfds_dir
  return cfg


def make_batch(seed=0, B=8, T=16):
  """A batch of random tokens over the small model's vocabulary: one document per row, every token counted."""
  import jax
  import jax.numpy as jnp
  tokens = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, 256)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': jnp.ones((B, T), jnp.int32),
          'positions': jnp.tile(jnp.arange(T), (B, 1)), 'loss_mask': jnp.ones((B, T))}


def sharded_train_step(cfg):
  """(mesh, fresh state, train step, batch sharding) of cfg on its mesh, the step jitted over the state's
  and the batch's shardings; run it under jax.set_mesh(mesh)."""
  import jax
  from nopejax import optim, sharding, step as step_lib
  mesh = sharding.make_mesh(cfg)
  tx = optim.make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, _, shardings = step_lib.abstract_state(cfg, mesh, tx)
    state = step_lib.init_state(cfg, shardings, tx)
  batch_sharding = sharding.batch_sharding(mesh, cfg.mesh.rules)
  train_step = jax.jit(step_lib.make_train_step(cfg, graphdef, tx), in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None))
  return mesh, state, train_step, batch_sharding


@pytest.fixture
def small_cfg(tfds_dir):
  return small_config(tfds_dir)


@pytest.fixture(scope='session')
def small_run(tfds_dir, tmp_path_factory):
  """(config, workdir) of one uninterrupted 40-step run of the small model, shared by the test files
  that only read a trained workdir; checkpoints at steps 20, 30 and 40, evaluation at 20 and 40."""
  from nopejax import loop
  workdir = str(tmp_path_factory.mktemp('small_run'))
  cfg = small_config(tfds_dir)
  cfg.train.eval_every = 20
  loop.run(cfg, workdir)
  return cfg, workdir


@pytest.fixture
def gcs():
  """An offline gs:// for this test (tests/fake_gcs.py): orbax, tensorstore, array_record and epath
  all reach the same in-memory bucket store."""
  import fake_gcs
  with fake_gcs.serve():
    yield fake_gcs


def damage(step_dir):
  """Overwrites every data file of a checkpoint step's model item, as a failing disk would."""
  for root, _, files in os.walk(os.path.join(step_dir, 'model')):
    for name in files:
      if os.path.basename(root) == 'd':
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')


def tree_digest(directory):
  """A hash of every file's path and bytes under `directory`: equal digests, nothing on disk changed."""
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()
