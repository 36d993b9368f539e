import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from conftest import small_config
from nopejax import config, model, optim


def split(cfg):
  return nnx.split(model.Transformer(cfg, nnx.Rngs(0)), optim.trainable_filter(cfg), ...)


def names(state):
  return {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]}


def test_pretraining_trains_all_but_temperatures_and_the_search_only_them():
  cfg = small_config()
  _, params, frozen = split(cfg)
  assert 'temperature' not in names(params) and names(frozen) == {'temperature'}
  cfg.train.trainable = 'temperature'
  _, params, frozen = split(cfg)
  assert names(params) == {'temperature'} and 'temperature' not in names(frozen)


def test_weight_decay_skips_norms_and_temperatures():
  cfg = small_config()
  cfg.train.warmup_steps = 0  # With zero gradients, only weight decay can move a parameter.
  cfg.train.learning_rate = 1e-2
  cfg.train.weight_decay = 0.5
  m = model.Transformer(cfg, nnx.Rngs(0))
  state = nnx.state(m, nnx.Param)  # Temperatures included, to see they are not decayed.
  tx = optim.make_optimizer(cfg)
  zero_grads = jax.tree.map(jnp.zeros_like, state)
  updates, _ = jax.jit(tx.update)(zero_grads, tx.init(state), state)
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = str(path[-2].key)
    if name in ('scale', 'temperature'):
      np.testing.assert_array_equal(update, 0.0)
    else:
      assert np.abs(update).max() > 0, name


def test_schedule_warms_up_then_decays_to_the_final_fraction():
  cfg = small_config()
  cfg.train.learning_rate, cfg.train.warmup_steps, cfg.train.steps = 0.1, 10, 100
  cfg.train.final_lr_fraction = 0.1
  schedule = optim.learning_rate_schedule(cfg)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 0.01, rtol=1e-6)


def test_clamp_projects_temperatures_and_slopes_only_with_min_slope():
  cfg = small_config()
  cfg.model.temperature_schedule = 'log'
  m = model.Transformer(cfg, nnx.Rngs(0))
  state = model.set_temperatures(nnx.state(m, nnx.Param), 0.5)
  state = jax.tree.map(lambda v: v.replace(v[...] - 2.0) if isinstance(v, model.TemperatureSlope) else v, state,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))  # Slopes a_h = -2.

  def leaves(tree, name):
    return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if str(path[-2].key) == name]

  free, kept = optim.clamp_temperatures(state, 1.0), optim.clamp_temperatures(state, 1.0, min_slope=0.0)
  for clamped in free, kept:
    assert leaves(clamped, 'temperature') and all((leaf == 1.0).all() for leaf in leaves(clamped, 'temperature'))
    np.testing.assert_array_equal(clamped['embed_VxD'][...], state['embed_VxD'][...])
  assert leaves(free, 'temperature_slope') and all((leaf == -2.0).all() for leaf in leaves(free, 'temperature_slope'))
  assert all((leaf == 0.0).all() for leaf in leaves(kept, 'temperature_slope'))


def test_shared_slopes_are_each_layers_mean_over_heads_for_every_octave():
  cfg = small_config()
  cfg.model.temperature_schedule, cfg.model.temperature_octaves = 'log', 2
  state = nnx.state(model.Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  H = cfg.model.num_heads
  slopes_KxH = jnp.arange(2 * H, dtype=jnp.float32).reshape(2, H)  # Octave k, head h: k H + h.
  state = jax.tree.map(lambda v: v.replace(slopes_KxH) if isinstance(v, model.TemperatureSlope) else v, state,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
  shared = optim.clamp_temperatures(state, 1.0, min_slope=None, share_slopes=True)
  slopes = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shared)[0] if str(path[-2].key) == 'temperature_slope']
  assert len(slopes) == cfg.model.num_layers
  for leaf in slopes:
    np.testing.assert_allclose(leaf, np.repeat(np.array([[(H - 1) / 2], [H + (H - 1) / 2]]), H, axis=1))


def test_model_and_temperature_partitions_move_with_their_own_rate_and_clipping():
  cfg = small_config()
  cfg.train.trainable = 'model+temperature'
  cfg.model.temperature_schedule, cfg.model.temperature_length = 'log', 8
  cfg.train.warmup_steps, cfg.train.weight_decay = 0, 0.0
  cfg.train.learning_rate, cfg.train.clip_norm = 1e-3, 1.0
  cfg.train.temperature.learning_rate, cfg.train.temperature.clip_norm = 0.1, 1e-2
  _, params, frozen = split(cfg)
  assert {'temperature', 'temperature_slope', 'q_DxHxDh'} <= names(params) and not names(frozen)
  tx = optim.make_optimizer(cfg)
  is_temperature = lambda path: 'temperature' in str(path[-2].key)
  grads = jax.tree_util.tree_map_with_path(lambda path, p: jnp.full_like(p, 1.0 if is_temperature(path) else 100.0), params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    # Adam's first step moves every coordinate by its partition's rate, whatever the gradient's size.
    np.testing.assert_allclose(np.abs(update), 0.1 if is_temperature(path) else 1e-3, rtol=1e-3)
  # Each partition was clipped to its own norm: Adam's first moment is (1 - b1) x the clipped gradient.
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  norms = sorted(float(optax.tree.norm(s.mu)) for s in adam)
  np.testing.assert_allclose(norms, [(1 - cfg.train.b1) * 1e-2, (1 - cfg.train.b1) * 1.0], rtol=1e-4)


def test_weight_decay_never_moves_temperatures_or_octave_slopes_whatever_their_shape():
  # Slopes of 2 octaves are [K, H] matrices: decay by rank would pull them toward 0 at train.weight_decay.
  for trainable in ('temperature', 'model+temperature'):
    cfg = small_config()
    cfg.train.trainable = trainable
    cfg.model.temperature_schedule, cfg.model.temperature_length, cfg.model.temperature_octaves = 'log', 8, 2
    cfg.train.warmup_steps, cfg.train.learning_rate, cfg.train.weight_decay = 0, 1e-2, 0.5
    cfg.train.temperature.weight_decay = 0.0
    _, params, _ = split(cfg)
    params = jax.tree.map(lambda v: v.replace(v[...] + 1.0) if isinstance(v, model.TemperatureSlope) else v, params,
                          is_leaf=lambda v: isinstance(v, nnx.Variable))  # Nonzero, so decay would move them.
    tx = optim.make_optimizer(cfg)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = {str(path[-2].key) for path, u in jax.tree_util.tree_flatten_with_path(updates)[0] if np.abs(u).max() > 0}
    assert 'temperature_slope' in names(params)
    assert moved == ({'q_DxHxDh', 'k_DxKxDh', 'v_DxKxDh', 'o_HxDhxD', 'gate_DxF', 'up_DxF', 'down_FxD', 'embed_VxD',
                      'head_DxV'} if trainable == 'model+temperature' else set()), trainable


def test_a_skipped_update_is_counted_in_the_state_and_leaves_the_schedule_where_it_was():
  cfg = small_config()
  cfg.train.learning_rate, cfg.train.warmup_steps = 0.1, 10
  _, params, _ = split(cfg)
  tx = optim.make_optimizer(cfg)
  update = jax.jit(tx.update)
  opt = tx.init(params)
  ones, nans = (jax.tree.map(lambda p: jnp.full_like(p, fill), params) for fill in (1.0, jnp.nan))
  for grads in (ones, nans, nans, ones):
    updates, opt = update(grads, opt, params)
    params = optax.apply_updates(params, updates)
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
  assert {k: int(v) for k, v in optim.skipped_updates(opt).items()} == {'nonfinite_in_a_row': 0, 'skipped_updates': 2}
  # Two updates applied: the next one applies the schedule at count 2, whatever the step.
  np.testing.assert_allclose(float(optim.applied_learning_rate(cfg, opt)), 0.1 * 2 / 10, rtol=1e-6)
  cfg.train.trainable = 'model+temperature'
  tx = optim.make_optimizer(cfg)
  opt = tx.init(split(cfg)[1])
  assert float(optim.applied_learning_rate(cfg, opt)) == 0.0


def test_min_temperature_bounds_the_ssmax_multiplier_at_the_schedule_length():
  cfg = small_config()
  cfg.search.min_temperature = 1.2
  assert optim.min_temperature(cfg) == 1.2
  cfg.model.temperature_schedule, cfg.model.temperature_length = 'ssmax', 64
  s_min = optim.min_temperature(cfg)
  np.testing.assert_allclose(s_min * np.log(64), 1.2, rtol=1e-12)  # The multiplier s_h ln i at i = L.
  state = model.set_temperatures(nnx.state(model.Transformer(cfg, nnx.Rngs(0)), model.Temperature), 0.1)
  clamped = jax.tree.leaves(optim.clamp_temperatures(state, s_min))
  assert clamped and all(np.allclose(leaf, s_min) for leaf in clamped)


def test_a_run_shorter_than_its_warmup_warms_up_over_all_but_its_last_step():
  cfg = small_config()
  cfg.train.learning_rate, cfg.train.warmup_steps, cfg.train.steps = 0.1, 100, 20
  config.validate(cfg)  # Accepted: a quick try of a config with a long warmup.
  schedule = optim.learning_rate_schedule(cfg)
  np.testing.assert_allclose([float(schedule(0)), float(schedule(19))], [0.0, 0.1], rtol=1e-6)
  assert optim.warmup_steps(cfg) == 19
