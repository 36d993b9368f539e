"""Orbax checkpoints: restoring onto any mesh and into scanned layers; a failed read told apart
(damage, another config's checkpoint, storage trouble tried again); the checks that refuse a
checkpoint of another run kind, model or schedule before any array is read."""
import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import small_config, tree_digest
from nopejax import checkpoint, data, loop, optim, sharding, step as step_lib
from nopejax.checkpoint import reads
from nopejax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def trained(small_run):
  cfg, workdir = small_run
  return cfg.copy_and_resolve_references(), workdir  # Tests may change their copy.


def restore_on(cfg, workdir, mesh_sizes):
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_sizes
  mesh = sharding.make_mesh(cfg)
  tx = optim.make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, abstract, _ = step_lib.abstract_state(cfg, mesh, tx)
    return checkpoint.restore(workdir, cfg, graphdef, abstract, data.train_iterator(cfg), 40)


def test_restore_onto_another_mesh_gives_the_same_arrays(trained):
  cfg, workdir = trained
  on_data, meta = restore_on(cfg, workdir, (8, 1, 1))
  on_cube, _ = restore_on(cfg, workdir, (2, 2, 2))
  assert meta['step'] == 40 and meta['kind'] == 'pretrain'
  assert int(on_cube['step']) == 40
  jax.tree.map(np.testing.assert_array_equal, on_data['params'], on_cube['params'])
  jax.tree.map(np.testing.assert_array_equal, on_data['opt'], on_cube['opt'])
  embed = on_cube['params']['embed_VxD'][...]
  assert embed.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')


def test_a_checkpoint_restores_into_scanned_layers_and_trains_on(trained):
  # Scanned or not, the layers' weights are stored one variable per layer: the same checkpoint
  # restores into either, and the scanned step continues from it.
  cfg, workdir = trained
  plain, _ = restore_on(cfg, workdir, (8, 1, 1))
  cfg.model.scan_layers, cfg.model.remat = True, 'full'
  scanned, _ = restore_on(cfg, workdir, (8, 1, 1))
  jax.tree.map(np.testing.assert_array_equal, plain['params'], scanned['params'])
  batch = next(data.train_iterator(cfg))
  losses = []
  for scan_layers, state in ((False, plain), (True, scanned)):
    cfg.model.scan_layers = scan_layers
    graphdef = step_lib.abstract_state(cfg, sharding.make_mesh(cfg), optim.make_optimizer(cfg))[0]
    losses.append(float(jax.jit(step_lib.make_eval_step(cfg, graphdef))(state['params'], state['frozen'], batch)[0]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def resume(cfg, workdir):
  """restore_newest as a run resuming in `workdir` on 8 devices calls it: (state, meta, step) or None."""
  mesh = sharding.make_mesh(cfg)
  with jax.set_mesh(mesh):
    graphdef, abstract, _ = step_lib.abstract_state(cfg, mesh, optim.make_optimizer(cfg))
    return checkpoint.restore_newest(workdir, cfg, graphdef, abstract, data.train_iterator(cfg))


def test_damaged_checkpoint_is_reported_in_one_sentence(trained, tmp_path):
  cfg, workdir = trained
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  model_dir = os.path.join(copy, 'checkpoints', '40', 'model')
  for root, _, files in os.walk(model_dir):
    for name in files:
      if name != '_METADATA' and not name.startswith('_'):
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r'checkpoints/40 is damaged \(.*\); delete that step '
                                                         'directory to fall back to an older one, or use another --workdir'):
    restore_on(cfg, copy, (8, 1, 1))


def small_run_flags(tfds_dir, workdir, **values):
  """conftest.small_config, changed by `values`, as command-line flags."""
  values = dict({'model.num_layers': 2, 'model.embed_dim': 64, 'model.num_heads': 4, 'model.num_kv_heads': 2,
                 'model.mlp_dim': 128, 'data.seq_len': 16, 'train.batch_size': 8, 'train.warmup_steps': 5,
                 'train.eval_every': 0, 'train.peak_flops_per_device': 1e9, 'data.tfds_dir': tfds_dir}, **values)
  return ['--config', 'configs/base.py', '--workdir', workdir] + [f'--config.{k}={v}' for k, v in values.items()]


def test_a_resume_with_another_temperature_schedule_stops_in_one_sentence_and_rolls_nothing_back(tfds_dir, tmp_path):
  """Steps saved with the log schedule do not fit a constant-schedule model: no reason to set them
  aside as damaged and train again from the step before them."""
  workdir = str(tmp_path / 'run')
  cfg = small_config(tfds_dir)
  cfg.train.steps, cfg.train.checkpoint_every, cfg.train.warmup_steps = 4, 2, 1
  loop.run(cfg, workdir)
  cfg.train.steps, cfg.model.temperature_schedule = 8, 'log'
  loop.run(cfg, workdir)
  before = tree_digest(workdir)
  flags = small_run_flags(tfds_dir, workdir, **{'train.steps': 8, 'train.checkpoint_every': 2, 'train.warmup_steps': 1})
  result = subprocess.run([sys.executable, '-m', 'nopejax.train', *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  after = result.stderr[result.stderr.index('error: '):]
  assert after == (f"error: The checkpoint at {workdir}/checkpoints/8 was saved with model.temperature_schedule='log' "
                   "but the config asks for 'constant'; pass --config.model.temperature_schedule=log or use another "
                   '--workdir.\n')
  assert 'Traceback' not in result.stderr
  assert tree_digest(workdir) == before  # Steps 5 to 8 and their metrics are all there.


def test_another_optimizer_partition_is_named_from_the_meta_or_from_the_stored_tree(trained, tmp_path):
  cfg, workdir = trained
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  before = tree_digest(copy)
  cfg.train.trainable = 'model+temperature'
  with pytest.raises(ConfigError, match=r"checkpoints/40 was saved by a run with train.trainable='model' but the config "
                                        "asks for 'model\\+temperature'; pass --config.train.trainable=model"):
    resume(cfg, copy)
  assert tree_digest(copy) == before
  for step in (20, 30, 40):  # Checkpoints that predate the key: the stored tree tells.
    meta_file = os.path.join(copy, 'checkpoints', str(step), 'meta', 'metadata')
    with open(meta_file) as f:
      meta = json.load(f)
    del meta['trainable']
    with open(meta_file, 'w') as f:
      json.dump(meta, f)
  before = tree_digest(copy)
  with pytest.raises(ConfigError, match=r'checkpoints/40 was saved with another config: its optimizer state has no '
                                        r'inner_state\.inner_states\..*; run with the config it was saved with'):
    resume(cfg, copy)
  assert tree_digest(copy) == before


@pytest.fixture
def flaky_storage(monkeypatch):
  """Makes orbax's reads raise `error` on the calls numbered in `failing` (1-based); no waiting between tries."""
  monkeypatch.setattr(reads, 'RETRY_DELAYS', (0.0, 0.0))
  real_restore = ocp.CheckpointManager.restore

  def make(error, failing):
    calls = []

    def restore(self, *args, **kwargs):
      calls.append(1)
      if len(calls) in failing:
        raise error
      return real_restore(self, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)
  return make


def test_a_transient_read_error_is_tried_again(trained, flaky_storage, caplog):
  cfg, workdir = trained
  flaky_storage(OSError('Connection reset by peer'), failing={1})
  _, meta, step = resume(cfg, workdir)
  assert step == meta['step'] == 40
  assert 'checkpoints/40 failed (OSError: Connection reset by peer); trying again in 0 s' in caplog.text


def test_a_read_error_that_persists_is_one_sentence_and_renames_nothing(trained, tmp_path, flaky_storage):
  cfg, workdir = trained
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  before = tree_digest(copy)
  flaky_storage(TimeoutError('The read operation timed out'), failing=range(1, 100))
  with pytest.raises(checkpoint.UnreadableCheckpoint, match=r'checkpoints/40 could not be read in 3 tries \(TimeoutError: '
                     r'The read operation timed out\); check the storage or the connection and run the same command again'):
    resume(cfg, copy)
  assert tree_digest(copy) == before


def test_transient_errors_are_told_from_damage():
  assert reads.is_transient(OSError('Connection reset by peer')) and reads.is_transient(TimeoutError())
  assert reads.is_transient(ValueError('UNAVAILABLE: Error reading "x" from gs://b/c: HTTP 503'))
  assert reads.is_transient(type('ServiceUnavailable', (type('ServerError', (Exception,), {}),), {})('503'))
  for damage in (FileNotFoundError(errno.ENOENT, 'gone'), ValueError('OUT_OF_RANGE: Requested byte range [0, 9)'),
                 json.JSONDecodeError('Expecting value', '{', 1), PermissionError(errno.EACCES, 'denied')):
    assert not reads.is_transient(damage), damage


def test_search_run_against_a_pretrain_workdir_is_refused(trained, tfds_dir):
  _, workdir = trained
  cfg = small_config(tfds_dir)
  cfg.train.trainable = 'temperature'
  cfg.search.base = workdir
  with pytest.raises(ConfigError, match='holds a pretrain run but the config describes a search run'):
    loop.run(cfg, workdir)


def test_position_encoding_and_tied_embeddings_are_checked_like_the_shape(trained):
  """Same arrays, another computation: a RoPE or tied config must not silently read a NoPE checkpoint."""
  cfg, workdir = trained
  meta = checkpoint.read_meta(workdir, 40)
  checkpoint.check_shape(meta, cfg, 'here')
  cfg.model.position = 'rope'
  with pytest.raises(ConfigError, match='model.position=nope but the config asks for rope; set --config.model.position=nope'):
    checkpoint.check_shape(meta, cfg, 'here')
  cfg.model.position = 'nope'
  cfg.model.rope_theta = 500000.0  # Unused without RoPE.
  checkpoint.check_shape(meta, cfg, 'here')
  cfg.model.tie_embeddings = True
  with pytest.raises(ConfigError, match='model.tie_embeddings=False but the config asks for True'):
    checkpoint.check_shape(meta, cfg, 'here')
  # Checkpoints written before these keys existed read as their defaults.
  cfg.model.tie_embeddings = False
  older = dict(meta, model={k: v for k, v in meta['model'].items() if k not in checkpoint.ARCHITECTURE_DEFAULTS})
  checkpoint.check_shape(older, cfg, 'here')
