import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import nopejax
from conftest import small_config
from nopejax import checkpoint, loop, model, optim, paths, search, sharding, step as step_lib
from nopejax.config import ConfigError

PRETRAIN_LENGTH = 16
# One worker runs this file under pytest-xdist (pyproject.toml: --dist=loadgroup), so the module's
# 300-step base run and its search are made once, not once per worker.
pytestmark = pytest.mark.xdist_group('test_search')


@pytest.fixture(scope='module')
def base_run(tfds_dir, tmp_path_factory):
  """A small NoPE model pretrained at length 16, long enough that its loss past 16 can be improved."""
  workdir = str(tmp_path_factory.mktemp('base'))
  cfg = small_config(tfds_dir)
  cfg.train.steps = 300
  cfg.train.batch_size = 16
  cfg.train.warmup_steps = 20
  cfg.train.log_every = 50
  cfg.train.checkpoint_every = 300
  loop.run(cfg, workdir)
  return workdir


def search_config(tfds_dir, base):
  cfg = small_config(tfds_dir)
  cfg.data.seq_len = 4 * PRETRAIN_LENGTH
  cfg.train.trainable = 'temperature'
  cfg.train.steps = 30
  cfg.train.warmup_steps = 3
  cfg.train.learning_rate = 0.1
  cfg.train.weight_decay = 0.0
  cfg.train.eval_every = 30
  cfg.train.eval_batches = 8
  cfg.train.checkpoint_every = 10
  cfg.search.base = base
  cfg.search.init = 'auto'
  cfg.search.init_candidates = (1.0,)  # The sweep then just measures the loss at c = 1.
  cfg.model.attention_impl = 'xla'  # The reference kernel; see the chunked search below.
  return cfg


@pytest.fixture(scope='module')
def search_run(base_run, tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('search'))
  cfg = search_config(tfds_dir, base_run)
  logged = loop.run(cfg, workdir)
  return cfg, workdir, logged


def non_temperature_params(m):
  return nnx.to_pure_dict(nnx.state(m, nnx.All(nnx.Param, nnx.Not(model.Temperature))))


def test_search_leaves_every_other_weight_bit_for_bit(base_run, search_run):
  _, workdir, _ = search_run
  base_model, _ = nopejax.load(base_run)
  searched_model, _ = nopejax.load(workdir)
  jax.tree.map(np.testing.assert_array_equal, non_temperature_params(base_model), non_temperature_params(searched_model))
  # ... while the temperatures did move.
  assert not np.allclose(search.temperatures_by_layer(nnx.state(searched_model)), 1.0)


def test_temperatures_are_clamped_at_the_minimum(search_run):
  _, workdir, _ = search_run
  temperatures = read_temperatures(workdir)
  assert temperatures.shape == (2, 4)
  assert temperatures.min() >= 1.0
  # Started at 1.0: heads whose gradient pointed below 1 sit exactly on the bound.
  assert (temperatures == 1.0).any() and (temperatures > 1.0).any()
  assert os.path.getsize(os.path.join(workdir, 'temperatures.png')) > 0


def read_temperatures(workdir):
  with open(os.path.join(workdir, 'temperatures.json')) as f:
    return np.array(json.load(f)['temperatures'])


def test_search_with_the_chunked_kernel_ends_at_the_temperatures_of_xla(search_run, tfds_dir, base_run, tmp_path):
  _, xla_workdir, _ = search_run
  cfg = search_config(tfds_dir, base_run)
  cfg.model.attention_impl = 'chunked'
  cfg.model.attention_block = 24  # 64 tokens: blocks of 24, 24 and 16 padded to 24.
  loop.run(cfg, str(tmp_path))
  moved = np.abs(read_temperatures(xla_workdir) - 1.0).max()
  assert moved > 0.05
  np.testing.assert_allclose(read_temperatures(str(tmp_path)), read_temperatures(xla_workdir), atol=1e-3 * moved)


def test_search_lowers_validation_loss_at_4x_the_training_length(search_run):
  _, workdir, logged = search_run
  with open(os.path.join(workdir, 'search_init.json')) as f:
    loss_at_one = json.load(f)['validation_loss']['1.0']
  assert logged['step'] == 30
  assert logged['eval_loss'] < loss_at_one


def test_search_checkpoint_holds_only_temperatures_and_points_to_its_base(base_run, search_run):
  _, workdir, _ = search_run
  step_dir = os.path.join(workdir, 'checkpoints', '30')
  saved = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, 'model'))
  leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
  assert len(leaves) == 2 and all(str(path[-1].key) == 'temperature' for path, _ in leaves)
  with open(os.path.join(step_dir, 'meta', 'metadata')) as f:
    meta = json.load(f)
  assert meta['kind'] == 'search'
  assert meta['base'] == {'workdir': os.path.abspath(base_run), 'step': 300}


def test_optimizer_state_exists_only_for_temperatures(tfds_dir, base_run):
  cfg = search_config(tfds_dir, base_run)
  mesh = sharding.make_mesh(cfg)
  _, abstract, _ = step_lib.abstract_state(cfg, mesh, optim.make_optimizer(cfg))
  leaves = jax.tree.leaves(abstract['opt'])
  # Adam's two moments per temperature (2 layers x 4 heads), plus Adam's and the schedule's step counters
  # and the counts of skipped updates.
  assert sum(x.size for x in leaves if x.dtype == jnp.float32) == 2 * 2 * 4
  assert [x.shape for x in leaves if x.dtype != jnp.float32] == [()] * 5
  assert model.count_params(abstract['params'], exclude=None) == 8


def count_dots(cfg):
  mesh = sharding.make_mesh(cfg)
  tx = optim.make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, abstract, _ = step_lib.abstract_state(cfg, mesh, tx)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ('inputs', 'targets', 'segment_ids', 'positions')}
    batch['loss_mask'] = jax.ShapeDtypeStruct((B, T), jnp.float32)
    text = jax.jit(step_lib.make_train_step(cfg, graphdef, tx)).lower(abstract, batch).as_text()
  return [shape.rstrip('x') for shape in re.findall(r'stablehlo.dot_general.*?-> tensor<([0-9x]*)f32>', text)]


def test_search_step_computes_no_weight_gradients(tfds_dir, base_run):
  pretrain_cfg = search_config(tfds_dir, base_run)
  pretrain_cfg.train.trainable, pretrain_cfg.search.base = 'model', ''
  pretrain_dots = count_dots(pretrain_cfg)
  search_dots = count_dots(search_config(tfds_dir, base_run))
  # A weight gradient contracts over batch and time, so its shape starts neither with the batch (8)
  # nor with batch x time (the projections' 2-D matmuls, model.project).
  rows = f'{pretrain_cfg.train.batch_size * pretrain_cfg.data.seq_len}x'
  weight_gradients = lambda dots: [d for d in dots if not d.startswith(('8x', rows))]
  assert len(weight_gradients(pretrain_dots)) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; head.
  assert weight_gradients(search_dots) == []
  assert len(search_dots) <= len(pretrain_dots) - 15


def test_search_resumes_on_another_mesh(base_run, tfds_dir, tmp_path):
  cfg = search_config(tfds_dir, base_run)
  cfg.train.stop_after = 10
  loop.run(cfg, str(tmp_path))
  saved = search.temperatures_by_layer(nnx.state(nopejax.load(str(tmp_path))[0]))
  cfg.train.stop_after = 0
  cfg.train.steps = 12
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(cfg)
  tx = optim.make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, abstract, _ = step_lib.abstract_state(cfg, mesh, tx)
    from nopejax import checkpoint, data
    state, meta = checkpoint.restore(str(tmp_path), cfg, graphdef, abstract, data.train_iterator(cfg), 10)
  assert search.temperatures_by_layer(state['params']) == saved
  weight = state['frozen']['blocks'][0]['attention']['q_DxHxDh'][...]
  assert weight.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor', None)
  assert dict(weight.sharding.mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  logged = loop.run(cfg, str(tmp_path))  # And training goes on there.
  assert logged['step'] == 12


def test_uniform_sweep_picks_the_lowest_validation_loss():
  cfg = small_config()
  cfg.search.init_candidates = (1.0, 1.5, 2.0)
  params = nnx.state(model.Transformer(cfg, nnx.Rngs(0)), model.Temperature)
  fake_loss = lambda params, frozen: abs(search.temperatures_by_layer(params)[0][0] - 1.4)
  best, losses = search.uniform_sweep(cfg, params, None, fake_loss)
  assert best == 1.5 and set(losses) == {1.0, 1.5, 2.0}


def test_uniform_sweep_of_an_ssmax_model_sets_the_multiplier_at_the_schedule_length():
  cfg = small_config()
  cfg.model.temperature_schedule, cfg.model.temperature_length = 'ssmax', 64
  cfg.search.init_candidates = (1.0, 1.5)
  params = nnx.state(model.Transformer(cfg, nnx.Rngs(0)), model.Temperature)
  seen = []
  search.uniform_sweep(cfg, params, None, lambda params, frozen: seen.append(search.temperatures_by_layer(params)) or 0.0)
  np.testing.assert_allclose(np.array(seen) * np.log(64), np.array([1.0, 1.5])[:, None, None] * np.ones((2, 2, 4)))


def test_ssmax_search_starts_clamps_and_loads_temperatures_as_multipliers_at_the_schedule_length(
    base_run, tfds_dir, tmp_path):
  """s_h ln L is what search.init, search.min_temperature and load(temperature=) name, as model init reads
  model.temperature: the search starts at s_h = 1 / ln L, stays above it, and load sets s_h = c / ln L."""
  cfg = search_config(tfds_dir, base_run)
  cfg.model.temperature_schedule, cfg.search.init = 'ssmax', '1.0'
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.eval_every, cfg.train.checkpoint_every = 4, 2, 0, 1
  cfg.train.stop_after = 1  # The first update has the warmup's rate 0: the start, as it was set.
  ln_L = np.log(4 * PRETRAIN_LENGTH)  # model.temperature_length 0: L is the search's length.
  loop.run(cfg, str(tmp_path))
  np.testing.assert_allclose(search.temperatures_by_layer(nnx.state(nopejax.load(str(tmp_path))[0])), 1 / ln_L,
                             rtol=1e-6)
  cfg.train.stop_after = 0
  loop.run(cfg, str(tmp_path))
  s_LxH = read_temperatures(str(tmp_path))
  assert (s_LxH * ln_L >= 1.0 - 1e-6).all() and s_LxH.min() < 1.0  # Bounded at the multiplier, not at s_h = 1.
  m, loaded_cfg = nopejax.load(str(tmp_path), temperature=1.5)
  np.testing.assert_allclose(search.temperatures_by_layer(nnx.state(m)), 1.5 / ln_L, rtol=1e-6)
  assert loaded_cfg.model.temperature == 1.5


def test_search_without_base_is_refused(tfds_dir, tmp_path):
  cfg = search_config(tfds_dir, '')
  with pytest.raises(ConfigError, match='needs search.base'):
    loop.run(cfg, str(tmp_path))
  cfg.search.base = str(tmp_path / 'missing')
  with pytest.raises(ConfigError, match='holds no checkpoint'):
    loop.run(cfg, str(tmp_path / 'out'))


def test_load_with_uniform_temperature(search_run):
  _, workdir, _ = search_run
  m, cfg = nopejax.load(workdir, temperature=1.5)
  assert cfg.model.temperature == 1.5
  assert np.all(np.array(search.temperatures_by_layer(nnx.state(m))) == 1.5)


def test_the_search_pins_its_base_step_against_the_base_runs_rotation(small_run, tfds_dir, tmp_path):
  base_cfg, trained = small_run
  base = str(tmp_path / 'base')
  shutil.copytree(trained, base)  # Checkpoints 20, 30, 40.
  shutil.rmtree(os.path.join(base, 'pins'), ignore_errors=True)  # Other tests' searches on the shared run.
  cfg = search_config(tfds_dir, base)
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.checkpoint_every, cfg.search.init = 2, 1, 2, '1.2'
  loop.run(cfg, str(tmp_path / 'search'))
  pins = os.listdir(os.path.join(base, 'pins'))
  assert len(pins) == 1 and pins[0].startswith('40-search-')
  # The base run goes on with one checkpoint kept: its rotation deletes 20, 30 and 50, never the pinned 40.
  base_cfg = base_cfg.copy_and_resolve_references()
  base_cfg.train.steps, base_cfg.train.keep_checkpoints = 60, 1
  loop.run(base_cfg, base)
  assert sorted(os.listdir(os.path.join(base, 'checkpoints')), key=int) == ['40', '60']
  model_, _ = nopejax.load(str(tmp_path / 'search'))
  assert np.all(np.array(search.temperatures_by_layer(nnx.state(model_))) >= 1.0)
  # A base step deleted all the same (or by a search that predates pins) is named, with the fix.
  shutil.rmtree(os.path.join(base, 'checkpoints', '40'))
  with pytest.raises(ConfigError, match=r'The search in .*search needs step 40 of its base run .*base, which is gone '
                     r'\(deleted, or rotated away before searches pinned their base step\); put .*checkpoints/40 back'):
    nopejax.load(str(tmp_path / 'search'))


def test_a_base_that_cannot_be_pinned_is_refused_with_the_fix(tmp_path, monkeypatch):
  def read_only(path, text):
    raise PermissionError(13, 'Permission denied')

  monkeypatch.setattr(paths, 'write_text', read_only)
  with pytest.raises(ConfigError, match=r'Cannot pin step 40 of search.base=.* against its rotation \(PermissionError: '
                     r'.*\); make that directory writable, or copy its config.json and checkpoints/40 to a directory'):
    checkpoint.pin(str(tmp_path / 'base'), 40, str(tmp_path / 'search'))


def test_log_search_over_mixed_lengths_starts_from_a_constant_base(base_run, tfds_dir, tmp_path):
  """The base has no slopes: they start at 0; the search trains c_h and a_h; within L it is the base."""
  cfg = search_config(tfds_dir, base_run)
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.eval_every, cfg.train.checkpoint_every = 4, 1, 0, 4
  cfg.model.temperature_schedule, cfg.model.temperature_length = 'log', PRETRAIN_LENGTH
  cfg.search.lengths, cfg.search.init = (2 * PRETRAIN_LENGTH, 4 * PRETRAIN_LENGTH), '1.0'
  loop.run(cfg, str(tmp_path))
  record = json.loads((tmp_path / 'temperatures.json').read_text())
  assert np.array(record['slopes']).shape == (2, 4) and np.abs(record['slopes']).max() > 0
  searched, base = nopejax.load(str(tmp_path))[0], nopejax.load(base_run)[0]
  tokens = jax.random.randint(jax.random.key(0), (2, 4 * PRETRAIN_LENGTH), 0, 256)
  logits, base_logits = searched(tokens), base(tokens)
  np.testing.assert_array_equal(logits[:, :PRETRAIN_LENGTH], base_logits[:, :PRETRAIN_LENGTH])
  assert np.abs(logits[:, PRETRAIN_LENGTH:] - base_logits[:, PRETRAIN_LENGTH:]).max() > 1e-4


def test_log_search_with_octave_slopes_shared_per_layer(base_run, tfds_dir, tmp_path):
  """A learned ramp (2 octaves) with search.share_slopes: each layer's slopes equal over its heads, per octave;
  within L still the base; a config with another number or shape of octaves is refused with the fix."""
  cfg = search_config(tfds_dir, base_run)
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.eval_every, cfg.train.checkpoint_every = 4, 1, 0, 4
  cfg.model.temperature_schedule, cfg.model.temperature_length = 'log', PRETRAIN_LENGTH
  cfg.model.temperature_octaves, cfg.search.share_slopes = 2, True
  cfg.search.lengths, cfg.search.init = (2 * PRETRAIN_LENGTH, 4 * PRETRAIN_LENGTH), '1.0'
  loop.run(cfg, str(tmp_path))
  slopes_LxKxH = np.array(json.loads((tmp_path / 'temperatures.json').read_text())['slopes'])
  assert slopes_LxKxH.shape == (2, 2, 4) and np.abs(slopes_LxKxH).max() > 0
  np.testing.assert_allclose(slopes_LxKxH, np.repeat(slopes_LxKxH[..., :1], 4, axis=-1), rtol=1e-6)
  assert not np.allclose(slopes_LxKxH[:, 0], slopes_LxKxH[:, 1])  # Each octave its own slope.
  searched, base = nopejax.load(str(tmp_path))[0], nopejax.load(base_run)[0]
  tokens = jax.random.randint(jax.random.key(0), (2, 4 * PRETRAIN_LENGTH), 0, 256)
  np.testing.assert_array_equal(searched(tokens)[:, :PRETRAIN_LENGTH], base(tokens)[:, :PRETRAIN_LENGTH])
  cfg.model.temperature_octaves = 1
  with pytest.raises(ConfigError, match='holds 2 log-schedule slope.s. per head but the config asks for 1; set '
                                        '--config.model.temperature_octaves=2'):
    checkpoint.restore_model(str(tmp_path), cfg, None)
  cfg.model.temperature_octaves, cfg.model.temperature_octave_shape = 2, 'step'  # Same arrays, another meaning.
  with pytest.raises(ConfigError, match="holds ramp-shaped octaves but the config asks for 'step'; set "
                                        '--config.model.temperature_octave_shape=ramp'):
    checkpoint.restore_model(str(tmp_path), cfg, None)


def test_search_init_from_starts_at_another_searchs_temperatures(search_run, base_run, tfds_dir, tmp_path):
  """A log search warm-started from a constant search: its c_h per layer and head, slopes 0 (lr ~0, so they stay)."""
  cfg = search_config(tfds_dir, base_run)
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.eval_every, cfg.train.checkpoint_every = 2, 1, 0, 2
  cfg.train.learning_rate = 1e-9
  cfg.model.temperature_schedule, cfg.model.temperature_length = 'log', PRETRAIN_LENGTH
  cfg.search.init, cfg.search.init_from = '1.0', search_run[1]
  loop.run(cfg, str(tmp_path))
  source = json.loads((paths.resolve(search_run[1]) / 'temperatures.json').read_text())['temperatures']
  record = json.loads((tmp_path / 'temperatures.json').read_text())
  assert len({round(c, 6) for row in source for c in row}) > 1  # Per head, not a uniform start.
  np.testing.assert_allclose(record['temperatures'], source, atol=1e-6)
  np.testing.assert_allclose(record['slopes'], np.zeros((2, 4)), atol=1e-6)


def test_search_init_from_without_temperatures_is_refused(tmp_path):
  with pytest.raises(ConfigError, match='holds no temperatures.json'):
    search.read_temperatures(str(tmp_path))
