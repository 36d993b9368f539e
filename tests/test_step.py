import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from conftest import make_batch, sharded_train_step, small_config
from nopejax import loss as loss_lib, model, optim, step as step_lib


def fresh_state(cfg):
  tx = optim.make_optimizer(cfg)
  graphdef, params, frozen = nnx.split(model.Transformer(cfg, nnx.Rngs(0)), optim.trainable_filter(cfg), ...)
  return graphdef, tx, {'step': jnp.int32(0), 'params': params, 'frozen': frozen, 'opt': tx.init(params)}


def test_cross_entropy_counts_only_masked_tokens():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
  total, count = step_lib.cross_entropy(logits, jnp.array([[0, 1, 1]]), jnp.array([[1.0, 0.0, 1.0]]))
  np.testing.assert_allclose(total, -np.log(0.5) - np.log(0.8), rtol=1e-6)
  assert count == 2


def test_pretrain_step_lowers_the_loss_and_leaves_temperatures():
  cfg = small_config()
  graphdef, tx, state = fresh_state(cfg)
  train_step = jax.jit(step_lib.make_train_step(cfg, graphdef, tx))
  batch = make_batch()
  temperatures = jax.tree.map(np.asarray, state['frozen'])
  losses = []
  for _ in range(10):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.5
  assert int(state['step']) == 10
  jax.tree.map(np.testing.assert_array_equal, state['frozen'], temperatures)
  np.testing.assert_allclose(float(metrics['learning_rate']), float(optim.learning_rate_schedule(cfg)(9)))


def test_search_step_clips_by_the_temperatures_norm_and_clamps():
  cfg = small_config()
  cfg.train.trainable = 'temperature'
  cfg.train.learning_rate = 0.5
  cfg.train.warmup_steps = 0
  cfg.search.min_temperature = 1.0
  graphdef, tx, state = fresh_state(cfg)
  batch = make_batch(1)

  def loss(params):
    logits = nnx.merge(graphdef, params, state['frozen'])(batch['inputs'], batch['segment_ids'])
    return step_lib.cross_entropy(logits, batch['targets'], batch['loss_mask'])[0] / batch['loss_mask'].sum()

  expected_norm = optax.tree.norm(jax.jit(jax.grad(loss))(state['params']))
  new_state, metrics = jax.jit(step_lib.make_train_step(cfg, graphdef, tx))(state, batch)
  np.testing.assert_allclose(float(metrics['grad_norm']), float(expected_norm), rtol=1e-5)
  temperatures = np.concatenate([np.asarray(t) for t in jax.tree.leaves(new_state['params'])])
  assert temperatures.min() == 1.0 and temperatures.max() > 1.0  # Some pushed down (clamped), some up.
  jax.tree.map(np.testing.assert_array_equal, new_state['frozen'], state['frozen'])


def test_microbatches_and_loss_chunks_give_the_whole_batch_step():
  cfg = small_config()
  graphdef, tx, state = fresh_state(cfg)
  batch = make_batch(2)
  batch['loss_mask'] = batch['loss_mask'].at[:3, :5].set(0.0)  # Uneven token counts across microbatches.
  whole_state, whole = jax.jit(step_lib.make_train_step(cfg, graphdef, tx))(state, batch)
  cfg.train.microbatches, cfg.train.loss_chunk = 4, 4
  micro_state, micro = jax.jit(step_lib.make_train_step(cfg, graphdef, tx))(state, batch)
  np.testing.assert_allclose(micro['loss'], whole['loss'], rtol=1e-6)
  np.testing.assert_allclose(micro['grad_norm'], whole['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(micro_state['params']), jax.tree.leaves(whole_state['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_eval_step_sums_loss_and_counts_tokens():
  cfg = small_config()
  graphdef, _, state = fresh_state(cfg)
  batch = make_batch(2)
  batch['loss_mask'] = batch['loss_mask'].at[:, :4].set(0.0)
  total, count = jax.jit(step_lib.make_eval_step(cfg, graphdef))(state['params'], state['frozen'], batch)
  assert float(count) == 8 * 12
  np.testing.assert_allclose(float(total) / float(count), np.log(256), atol=0.05)  # Untrained: near uniform.


def test_steps_place_tokens_at_the_batch_positions():
  """RoPE models read batch['positions'] (packed documents restart them); spreading them changes the loss."""
  cfg = small_config()
  cfg.model.position = 'rope'
  cfg.model.rope_theta = 100.0
  graphdef, _, state = fresh_state(cfg)
  eval_step = jax.jit(step_lib.make_eval_step(cfg, graphdef))
  batch = make_batch(3)
  total, _ = eval_step(state['params'], state['frozen'], batch)
  shifted, _ = eval_step(state['params'], state['frozen'], dict(batch, positions=batch['positions'] + 5))
  spread, _ = eval_step(state['params'], state['frozen'], dict(batch, positions=batch['positions'] * 3))
  np.testing.assert_allclose(float(shifted), float(total), rtol=1e-5)  # Relative positions only.
  assert abs(float(spread) - float(total)) > 1e-3


def test_length_weights_weigh_each_target_length_equally():
  losses = jnp.arange(8.0)[None].repeat(2, axis=0)  # Loss t at position t.
  mask = jnp.ones((2, 8)).at[1, 1].set(0.0)
  first2 = (0 + 1 + 0) / 3  # Row 1's position 1 is masked.
  all8 = (2 * 28 - 1) / 15
  np.testing.assert_allclose(jnp.sum(losses * step_lib.length_weights(mask, (2, 8))), (first2 + all8) / 2, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(losses * step_lib.length_weights(mask, (8,))), all8, rtol=1e-6)


def test_chunked_cross_entropy_gives_the_plain_loss_and_gradients():
  """Its own VJP (logits recomputed a chunk at a time) matches autodiff of the whole logits."""
  cfg = small_config()
  graphdef, params = nnx.split(model.Transformer(cfg, nnx.Rngs(0)))
  batch = make_batch(4)
  batch['loss_mask'] = batch['loss_mask'].at[:3, :5].set(0.0)

  def loss(params, chunk):
    cfg.train.loss_chunk = chunk
    return step_lib.loss_sums(cfg, nnx.merge(graphdef, params), batch)

  (plain, plain_count), plain_grads = jax.value_and_grad(loss, has_aux=True)(params, 0)
  for chunk in (4, 16):
    (total, count), grads = jax.value_and_grad(loss, has_aux=True)(params, chunk)
    np.testing.assert_allclose(total, plain, rtol=1e-6)
    assert count == plain_count == 8 * 16 - 15
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_gradient_of_the_token_weights_and_of_inputs_only():
  x_BxTxD = jax.random.normal(jax.random.key(0), (2, 8, 16))
  w_DxV = jax.random.normal(jax.random.key(1), (16, 32))
  targets_BxT = jax.random.randint(jax.random.key(2), (2, 8), 0, 32)
  weights_BxT = jax.random.uniform(jax.random.key(3), (2, 8))
  plain = lambda x, w, weights: loss_lib.cross_entropy(x @ w, targets_BxT, weights)[0]
  chunked = lambda x, w, weights: loss_lib.chunked_cross_entropy(x, w, targets_BxT, weights, 2)
  for argnums in ((0, 1, 2), (0,), (1,)):  # A frozen projection (the search) forms no gradient for it.
    for a, b in zip(jax.grad(chunked, argnums)(x_BxTxD, w_DxV, weights_BxT),
                    jax.grad(plain, argnums)(x_BxTxD, w_DxV, weights_BxT)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_head_inputs_multiply_to_the_model_head():
  cfg = small_config()
  for tied in (False, True):
    cfg.model.tie_embeddings = tied
    m = model.Transformer(cfg, nnx.Rngs(0))
    x_BxTxD = jax.random.normal(jax.random.key(5), (2, 16, cfg.model.embed_dim))
    x_normed_BxTxD, w_DxV = step_lib.head_inputs(m, x_BxTxD)
    np.testing.assert_allclose(x_normed_BxTxD @ w_DxV, m.head(x_BxTxD), rtol=1e-5, atol=1e-6)


def test_a_pretrain_with_loss_chunks_has_the_losses_of_the_whole_logits():
  losses = {}
  for chunk in (0, 4):
    cfg = small_config()
    cfg.train.loss_chunk = chunk
    graphdef, tx, state = fresh_state(cfg)
    train_step = jax.jit(step_lib.make_train_step(cfg, graphdef, tx))
    losses[chunk] = []
    for _ in range(6):
      state, metrics = train_step(state, make_batch(7))
      losses[chunk].append(float(metrics['loss']))
  np.testing.assert_allclose(losses[4], losses[0], rtol=1e-5)
  assert losses[0][-1] < losses[0][0]


def test_search_step_with_loss_chunks_matches_the_whole_logits():
  results = []
  for chunk in (0, 8):
    cfg = small_config()
    cfg.train.trainable = 'temperature'
    cfg.train.loss_chunk = chunk
    graphdef, tx, state = fresh_state(cfg)
    results.append(jax.jit(step_lib.make_train_step(cfg, graphdef, tx))(state, make_batch(6)))
  np.testing.assert_allclose(results[1][1]['grad_norm'], results[0][1]['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[1][0]['params']), jax.tree.leaves(results[0][0]['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_chunks_give_the_same_step_on_an_fsdp_mesh():
  """Sharded as on a slice (batch over data and fsdp, weights over fsdp): the chunks' logits and the
  projection's gradient keep the partitioner's layouts and the step is the whole-logits one."""
  results = []
  for chunk in (0, 4):
    cfg = small_config()
    cfg.model.num_layers = 1  # The head and its loss are what the chunks change; one block compiles faster.
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.train.loss_chunk = chunk
    mesh, state, train_step, batch_sharding = sharded_train_step(cfg)
    with jax.set_mesh(mesh):
      new_state, metrics = train_step(state, jax.device_put(make_batch(8), batch_sharding))
      results.append((jax.device_get(new_state['params']), jax.device_get(metrics)))
  (whole_params, whole), (chunked_params, chunked) = results
  np.testing.assert_allclose(chunked['loss'], whole['loss'], rtol=1e-6)
  np.testing.assert_allclose(chunked['grad_norm'], whole['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(chunked_params), jax.tree.leaves(whole_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
