import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from nopejax import config, model, optim


def make(cfg, seed=0):
  return model.Transformer(cfg, nnx.Rngs(seed))


@nnx.jit
def forward(m, tokens, segment_ids=None, positions=None):
  return m(tokens, segment_ids, positions)


def rope_config(seed_theta=100.0):
  cfg = small_config()
  cfg.model.position = 'rope'
  cfg.model.rope_theta = seed_theta
  return cfg


def position_config(method):
  """small_config with a position method: 'nope', 'rope', 'alibi', 'kerple', or RoPE scalings past an
  original length of 8 tokens ('yarn_logn': YaRN at each forward's length / 8 with log-n; 'dynamic_llama4':
  dynamic NTK with Llama 4's temperature from position 3; 'hybrid': NoPE then RoPE with YaRN, model.rope_layers)."""
  if method == 'nope':
    return small_config()
  cfg = rope_config()
  cfg.model.original_length = 8
  if method == 'alibi':
    cfg.model.position = 'alibi'
  elif method == 'yarn_logn':
    cfg.model.rope_scaling, cfg.model.rope_scaling_factor, cfg.model.logn = 'yarn', 0.0, True
  elif method == 'kerple':
    cfg.model.position = 'kerple'
  elif method == 'hybrid':  # A NoPE layer, then a RoPE layer with YaRN (whose factor the NoPE layer skips).
    cfg.model.rope_layers = '0,1'
    cfg.model.rope_scaling, cfg.model.rope_scaling_factor = 'yarn', 0.0
  elif method == 'dynamic_llama4':
    cfg.model.rope_scaling, cfg.model.rope_scaling_factor = 'dynamic', 2.0
    cfg.model.llama4_scaling, cfg.model.llama4_floor_scale = True, 4.0
  return cfg


POSITION_METHODS = ['nope', 'rope', 'alibi', 'kerple', 'yarn_logn', 'dynamic_llama4', 'hybrid']



def test_project_is_the_einsum_over_the_last_axis():
  x_BxTxD = jax.random.normal(jax.random.key(0), (2, 3, 8))
  w_DxHxK = jax.random.normal(jax.random.key(1), (8, 4, 5))
  np.testing.assert_allclose(model.project(x_BxTxD, w_DxHxK), jnp.einsum('btd,dhk->bthk', x_BxTxD, w_DxHxK), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.project(x_BxTxD, w_DxHxK[:, 0]), x_BxTxD @ w_DxHxK[:, 0], rtol=1e-5, atol=1e-5)


def test_logits_shape_dtype_and_grouped_query_heads():
  cfg = small_config()
  m = make(cfg)
  assert m.blocks[0].attention.k_DxKxDh.shape == (64, 2, 16)  # 2 kv heads serve 4 query heads.
  logits = forward(m, jnp.zeros((3, 16), jnp.int32))
  assert logits.shape == (3, 16, 256) and logits.dtype == jnp.float32


def test_temperatures_are_float32_per_head_and_start_at_config_value():
  cfg = small_config()
  cfg.model.dtype = 'bfloat16'
  cfg.model.temperature = 1.5
  m = make(cfg)
  temps = nnx.state(m, model.Temperature)
  leaves = jax.tree.leaves(temps)
  assert len(leaves) == cfg.model.num_layers
  for t in leaves:
    assert t.shape == (4,) and t.dtype == jnp.float32
    np.testing.assert_array_equal(t, 1.5)
  assert m(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32


def test_temperature_scales_queries():
  """A model with temperature c equals one with q weights times c (q is scaled before attention)."""
  cfg = small_config()
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  scaled_temperature = make(cfg)
  for block in scaled_temperature.blocks:
    block.attention.temperature[...] = jnp.array([1.0, 1.3, 1.6, 2.0])
  scaled_weights = make(cfg)
  for block in scaled_weights.blocks:
    block.attention.q_DxHxDh[...] = block.attention.q_DxHxDh[...] * jnp.array([1.0, 1.3, 1.6, 2.0])[None, :, None]
  np.testing.assert_allclose(forward(scaled_temperature, tokens), forward(scaled_weights, tokens), atol=1e-4)
  assert not np.allclose(forward(scaled_temperature, tokens), forward(make(cfg), tokens), atol=1e-3)


def test_causal_and_packed_documents_do_not_see_each_other():
  cfg = small_config()
  m = make(cfg)
  doc_a = jax.random.randint(jax.random.key(1), (1, 6), 0, 256)
  doc_b = jax.random.randint(jax.random.key(2), (1, 10), 0, 256)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segments = jnp.array([[1] * 6 + [2] * 10])
  logits = forward(m, packed, segments)
  # No position encoding: document b alone, from position 0, gives the same logits as packed.
  np.testing.assert_allclose(logits[:, 6:], forward(m, doc_b), atol=1e-5)
  np.testing.assert_allclose(logits[:, :6], forward(m, doc_a), atol=1e-5)
  # Without segment ids, b's tokens attend to a's.
  assert not np.allclose(forward(m, packed)[:, 6:], forward(m, doc_b), atol=1e-3)
  # Causal: changing the last token changes no earlier logit.
  changed = packed.at[0, -1].set((packed[0, -1] + 1) % 256)
  np.testing.assert_allclose(forward(m, changed, segments)[:, :-1], logits[:, :-1], atol=1e-6)


def test_rope_packed_documents_restart_their_positions():
  """With RoPE, a packed document whose positions restart at 0 gives the logits it gives alone."""
  m = make(rope_config())
  docs = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
  alone = forward(m, docs, jnp.ones((2, 8), jnp.int32), jnp.tile(jnp.arange(8), (2, 1)))
  packed = docs.reshape(1, 16)
  segments = jnp.array([[1] * 8 + [2] * 8])
  restarting = jnp.tile(jnp.arange(8), (1, 2))
  logits = forward(m, packed, segments, restarting)
  np.testing.assert_allclose(logits.reshape(2, 8, -1), alone, atol=1e-5)
  # RoPE is relative: continuing the positions (8..15) only shifts the second document's, which
  # changes nothing...
  continuing = jnp.arange(16)[None]
  np.testing.assert_allclose(forward(m, packed, segments, continuing), logits, atol=1e-5)
  # ... but spreading them apart does, where NoPE ignores positions altogether.
  spread = restarting * 3
  assert not np.allclose(forward(m, packed, segments, spread), logits, atol=1e-3)
  nope = make(small_config())
  np.testing.assert_allclose(forward(nope, packed, segments, spread), forward(nope, packed, segments, restarting), atol=1e-6)


def test_tied_embeddings_project_with_the_embedding():
  untied_cfg, tied_cfg = small_config(), small_config()
  tied_cfg.model.tie_embeddings = True
  untied, tied = make(untied_cfg), make(tied_cfg)
  assert not hasattr(tied, 'head_DxV')
  V, D = tied.embed_VxD.shape
  assert model.count_params(nnx.state(untied)) - model.count_params(nnx.state(tied)) == V * D
  untied.embed_VxD[...] = tied.embed_VxD[...]
  untied.head_DxV[...] = tied.embed_VxD[...].T
  for a, b in zip(untied.blocks, tied.blocks):
    nnx.update(a, nnx.state(b))
  nnx.update(untied.final_norm, nnx.state(tied.final_norm))
  tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, 256)
  np.testing.assert_allclose(forward(tied, tokens), forward(untied, tokens), atol=1e-6)


def test_remat_changes_nothing_but_memory():
  cfg = small_config()
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 256)

  def loss_and_grads(cfg):
    graphdef, params, frozen = nnx.split(make(cfg), optim.trainable_filter(cfg), ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, frozen)(tokens) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  plain_loss, plain_grads = loss_and_grads(cfg)
  cfg.model.remat = 'full'
  remat_loss, remat_grads = loss_and_grads(cfg)
  np.testing.assert_allclose(plain_loss, remat_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('remat', ['save_qkv_proj', 'offload'])
def test_scanned_layers_compute_what_the_unrolled_ones_do_from_the_same_state(remat):
  # The same state runs either way (so either layout's checkpoint restores into the other), under
  # a named remat policy too, the layers' inputs kept in host memory with 'offload'.
  cfg = small_config()
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 256)
  graphdef, params, frozen = nnx.split(make(cfg), optim.trainable_filter(cfg), ...)

  def loss_and_grads(scan_layers, remat):
    cfg.model.scan_layers, cfg.model.remat = scan_layers, remat
    graphdef_ = nnx.split(nnx.eval_shape(lambda: make(cfg)), optim.trainable_filter(cfg), ...)[0]
    loss = lambda p: jnp.mean(nnx.merge(graphdef_, p, frozen)(tokens) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  plain_loss, plain_grads = loss_and_grads(False, 'none')
  scan_loss, scan_grads = loss_and_grads(True, remat)
  assert jax.tree.structure(plain_grads) == jax.tree.structure(scan_grads)
  np.testing.assert_allclose(plain_loss, scan_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(scan_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_1b_config_has_the_papers_parameter_count():
  cfg = config.from_file('configs/1b.py')
  state = nnx.state(nnx.eval_shape(lambda: make(cfg)))
  assert model.count_params(state) == 1_100_048_384
  assert model.count_params(state, model.Temperature, exclude=None) == 22 * 32


def test_flops_per_token_counts_matmul_weights_and_attention():
  cfg = small_config()
  D, F, V, L, T = 64, 128, 256, 2, 16
  weights = L * (D * D * 2 + D * 32 * 2 + 3 * D * F) + D * V
  assert model.flops_per_token(cfg) == 6 * weights + 12 * L * D * T


@pytest.mark.parametrize('position', POSITION_METHODS)
def test_chunked_forward_equals_the_training_forward(position):
  """The long-context path, the xla kernel and the chunked kernel (blocks of 8, padded) agree for every
  position method, packed documents included."""
  cfg = position_config(position)
  m = make(cfg)
  for block in m.blocks:
    block.attention.temperature[...] = jnp.array([1.0, 1.3, 1.6, 2.0])
  tokens = jax.random.randint(jax.random.key(4), (2, 21), 0, 256)
  x, entropy = nnx.jit(lambda m, t: m.forward_chunked(t, 8, with_entropy=True))(m, tokens)
  np.testing.assert_allclose(m.head(x), forward(m, tokens), atol=1e-5)
  segments = jnp.array([[1] * 9 + [2] * 12, [1] * 21])
  packed_positions = jnp.array([list(range(9)) + list(range(12)), list(range(21))])
  cfg.model.attention_impl, cfg.model.attention_block = 'chunked', 8
  chunked = make(cfg)
  nnx.update(chunked, nnx.state(m))
  np.testing.assert_allclose(forward(chunked, tokens, segments, packed_positions),
                             forward(m, tokens, segments, packed_positions), atol=1e-5)
  assert entropy.shape == (2, 2, 4, 21)  # [layers, batch, heads, positions]
  # Every entropy lies in [0, ln i] at 1-based position i.
  assert np.all(entropy >= -1e-6) and np.all(entropy <= np.log(np.arange(1, 22)) + 1e-5)


def test_kerple_learns_its_bias_through_either_kernel():
  """The gradient of the model's loss reaches KERPLE's r1, r2, equal with the xla and the chunked kernel."""
  cfg = position_config('kerple')
  tokens = jax.random.randint(jax.random.key(6), (2, 21), 0, 256)

  def grads(implementation):
    cfg.model.attention_impl, cfg.model.attention_block = implementation, 8
    graphdef, state = nnx.split(make(cfg))
    loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(tokens) ** 2)
    return jax.jit(jax.grad(loss))(state)['blocks'][0]['attention']

  xla, chunked = grads('xla'), grads('chunked')
  for name in ('kerple_r1_H', 'kerple_r2_H'):
    assert float(jnp.abs(xla[name][...]).max()) > 0
    np.testing.assert_allclose(chunked[name][...], xla[name][...], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('position', POSITION_METHODS)
def test_cached_decoding_equals_the_full_forward_pass(position):
  """Prefill of right-padded prompts of different lengths, then one token at a time with the KV cache
  (with RoPE the cache holds keys rotated by their positions, and each new query by its index; length-
  dependent scalings read the cache's length, here the full forward's)."""
  m = make(position_config(position), seed=1)
  for block in m.blocks:
    block.attention.temperature[...] = jnp.array([1.0, 1.5, 2.0, 1.2])  # The cache holds unscaled keys.
  tokens = jax.random.randint(jax.random.key(5), (2, 24), 0, 256)
  full = forward(m, tokens)
  prompt_lengths = jnp.array([9, 14])
  # Row 0's padding (positions 9..13) holds junk the decoding steps must overwrite before use.
  prompts = tokens[:, :14].at[0, 9:].set(7)

  @nnx.jit
  def run(m, prompts, tokens):
    x, cache = m.prefill(prompts, 24, query_chunk=4)
    logits = [m.head(x)]
    for step in range(10):
      index = prompt_lengths + step
      step_logits, cache = m.decode(tokens[jnp.arange(2), index], cache, index)
      logits.append(step_logits)
    return logits

  prefill_logits, *step_logits = run(m, prompts, tokens)
  np.testing.assert_allclose(prefill_logits[1], full[1, :14], atol=1e-5)
  np.testing.assert_allclose(prefill_logits[0, :9], full[0, :9], atol=1e-5)
  for step, logits in enumerate(step_logits):
    np.testing.assert_allclose(logits, full[jnp.arange(2), prompt_lengths + step], atol=1e-5)


def schedule_config(schedule):
  cfg = small_config()
  cfg.model.temperature_schedule, cfg.model.temperature_length = schedule, 8
  return cfg


def test_log_schedule_is_the_base_model_within_its_length():
  base, m = make(small_config()), make(schedule_config('log'))  # Same seed: the same weights.
  for block in m.blocks:
    block.attention.temperature[...] = jnp.array([1.5, 2.0, 0.7, 1.2])
    block.attention.temperature_slope[...] = jnp.array([0.5, -0.2, 0.1, 1.0])
  tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, 256)
  logits, base_logits = forward(m, tokens), forward(base, tokens)
  np.testing.assert_array_equal(logits[:, :8], base_logits[:, :8])
  assert np.abs(logits[:, 8:] - base_logits[:, 8:]).max() > 1e-3
  # Slopes are not temperatures for a uniform c: set_temperatures leaves them.
  state = model.set_temperatures(nnx.state(m), 1.3)
  np.testing.assert_array_equal(state['blocks'][0]['attention']['temperature_slope'][...], np.float32([0.5, -0.2, 0.1, 1.0]))


@pytest.mark.parametrize('schedule', ['log', 'ssmax'])
def test_schedules_agree_across_kernels_and_the_long_context_paths(schedule):
  """xla, chunked, the chunked evaluation forward and cached decoding all see each query's position."""
  cfg = schedule_config(schedule)
  m = make(cfg)
  for block in m.blocks:
    block.attention.temperature[...] = jnp.array([1.2, 0.6, 0.9, 1.5])
    if schedule == 'log':
      block.attention.temperature_slope[...] = jnp.array([0.4, 0.2, -0.1, 0.8])
  tokens = jax.random.randint(jax.random.key(7), (2, 20), 0, 256)
  reference = forward(m, tokens)
  for block in m.blocks:
    block.attention.implementation, block.attention.block_size = 'chunked', 8
  np.testing.assert_allclose(forward(m, tokens), reference, atol=1e-5)
  x, _ = nnx.jit(lambda m, t: m.forward_chunked(t, 8))(m, tokens)
  np.testing.assert_allclose(m.head(x), reference, atol=1e-5)

  @nnx.jit
  def decode_tail(m, tokens):
    _, cache = m.prefill(tokens[:, :12], 20, query_chunk=4)
    return [m.decode(tokens[:, i], cache, jnp.full((2,), i))[0] for i in (12,)]

  np.testing.assert_allclose(decode_tail(m, tokens)[0], reference[:, 12], atol=1e-5)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_hybrid_with_uniform_flags_is_the_nope_or_the_rope_model_bit_for_bit(scan_layers):
  """Flags all 0 compute the NoPE model, all 1 the RoPE model, exactly, unrolled or scanned (flags as data)."""
  tokens = jax.random.randint(jax.random.key(8), (2, 16), 0, 256)

  def logits(position, rope_layers=''):
    cfg = rope_config() if position == 'rope' else small_config()
    cfg.model.rope_layers, cfg.model.scan_layers = rope_layers, scan_layers
    config.validate(cfg)
    return forward(make(cfg), tokens)

  nope, rope = logits('nope'), logits('rope')
  np.testing.assert_array_equal(logits('rope', '0,0'), nope)
  np.testing.assert_array_equal(logits('rope', '1,1'), rope)
  mixed = logits('rope', '1,0')
  assert np.abs(mixed - rope).max() > 1e-3 and np.abs(mixed - nope).max() > 1e-3


def test_hybrid_trains_and_scanned_layers_keep_each_layers_position():
  """Scanned (remat) and unrolled hybrids give the same loss and gradients from one state; a few AdamW
  steps on the scanned one lower the loss, the temperatures of both kinds of layer frozen."""
  import optax
  cfg = position_config('hybrid')
  tokens = jax.random.randint(jax.random.key(9), (4, 16), 0, 256)
  graphdef, params, frozen = nnx.split(make(cfg), optim.trainable_filter(cfg), ...)

  def loss_fn(scan_layers):
    cfg.model.scan_layers, cfg.model.remat = scan_layers, 'full' if scan_layers else 'none'
    graphdef_ = nnx.split(nnx.eval_shape(lambda: make(cfg)), optim.trainable_filter(cfg), ...)[0]
    return lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef_, p, frozen)(tokens[:, :-1]), tokens[:, 1:]))

  plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss_fn(False)))(params)
  scan_loss_fn = loss_fn(True)
  scan_loss, scan_grads = jax.jit(jax.value_and_grad(scan_loss_fn))(params)
  np.testing.assert_allclose(plain_loss, scan_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(scan_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)

  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(scan_loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(5):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1
