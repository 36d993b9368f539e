"""load(workdir): a workdir's latest model on one device, and its one-sentence refusals."""
import os
import shutil

import jax
import numpy as np
import pytest

import nopejax
from nopejax import checkpoint, data, optim, sharding, step as step_lib
from nopejax.config import ConfigError
from conftest import damage


@pytest.fixture
def trained(small_run):
  cfg, workdir = small_run
  return cfg.copy_and_resolve_references(), workdir  # Tests may change their copy.


def restored_params(cfg, workdir):
  """The params of step 40 as a resumed run on 8 devices restores them."""
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 8, 1, 1
  mesh = sharding.make_mesh(cfg)
  with jax.set_mesh(mesh):
    graphdef, abstract, _ = step_lib.abstract_state(cfg, mesh, optim.make_optimizer(cfg))
    return checkpoint.restore(workdir, cfg, graphdef, abstract, data.train_iterator(cfg), 40)[0]['params']


def test_load_matches_the_restored_train_state(trained):
  cfg, workdir = trained
  params = restored_params(cfg, workdir)
  m, _ = nopejax.load(workdir)
  np.testing.assert_array_equal(m.blocks[1].mlp.up_DxF[...], params['blocks'][1]['mlp']['up_DxF'][...])


def test_a_damaged_newest_step_is_passed_over_and_left_where_it_is(trained, tmp_path, caplog):
  _, workdir = trained
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  damage(os.path.join(copy, 'checkpoints', '40'))
  shutil.rmtree(os.path.join(copy, 'checkpoints', '30', 'meta'))  # Unreadable meta: damage too.
  model, _, step = checkpoint.load_with_step(copy)
  assert step == 20
  assert 'checkpoints/40 is damaged' in caplog.text and 'checkpoints/30 is damaged' in caplog.text
  assert 'Using step 20 instead' in caplog.text
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['20', '30', '40']  # Reading renames nothing.
  params = restored_params(*trained)
  assert not np.array_equal(model.blocks[1].mlp.up_DxF[...], params['blocks'][1]['mlp']['up_DxF'][...])
  damage(os.path.join(copy, 'checkpoints', '20'))
  with pytest.raises(checkpoint.DamagedCheckpoint, match='checkpoints/40 is damaged'):
    nopejax.load(copy)


def test_broken_config_and_missing_workdirs(trained, tmp_path):
  _, workdir = trained
  with pytest.raises(ConfigError, match='has no config.json'):
    nopejax.load(str(tmp_path / 'nothing'))
  os.makedirs(tmp_path / 'empty')
  shutil.copy(os.path.join(workdir, 'config.json'), tmp_path / 'empty')
  with pytest.raises(ConfigError, match='holds no checkpoint'):
    nopejax.load(str(tmp_path / 'empty'))
  with open(tmp_path / 'empty' / 'config.json', 'r+') as f:
    f.truncate(100)
  with pytest.raises(ConfigError, match=r'empty/config.json is not valid JSON \(.*\); restore it from config_history.jsonl'):
    nopejax.load(str(tmp_path / 'empty'))
