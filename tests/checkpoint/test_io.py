"""Orbax checkpoints: restoring onto any mesh and into scanned layers, damaged steps, and the
checks that refuse a checkpoint of another run kind or model."""
import os
import shutil

import jax
import numpy as np
import pytest

import nopejax
from conftest import small_config
from nopejax import checkpoint, data, loop, optim, sharding, step as step_lib
from nopejax.config import ConfigError


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
  with pytest.raises(ConfigError, match=r'checkpoints/40 does not fit this model or is damaged .*use a matching config or another --workdir'):
    nopejax.load(copy)


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
