import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from nopejax import attention, positions
from nopejax.config import ConfigError


def reference_attention(q, k, v, segment_ids):
  """Plain softmax attention written out: GQA by repeating kv heads, causal and segment masks."""
  B, T, H, Dh = q.shape
  k = jnp.repeat(k, H // k.shape[2], axis=2)
  v = jnp.repeat(v, H // v.shape[2], axis=2)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(Dh)
  allowed = np.tril(np.ones((T, T), bool))[None, None] & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  logits = jnp.where(allowed, logits, -1e30)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, -1), v)


def test_attend_matches_reference_with_gqa_and_segments():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 8, 4, 16))
  k = jax.random.normal(kk, (2, 8, 2, 16))
  v = jax.random.normal(kv, (2, 8, 2, 16))
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3], [1] * 8])
  np.testing.assert_allclose(attention.attend(q, k, v, segment_ids),
                             reference_attention(q, k, v, segment_ids), atol=1e-5)


def test_scale_queries_multiplies_each_head_by_its_temperature():
  q = jnp.ones((1, 2, 3, 4), jnp.bfloat16)
  scaled = attention.scale_queries(q, jnp.array([1.0, 1.5, 2.0]))
  assert scaled.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(scaled[0, 0, :, 0], np.float32), [1.0, 1.5, 2.0])


def test_temperature_on_q_equals_sharper_logits():
  """softmax(c q.k / sqrt(d)): scaling q by c is the same as scaling the logits by c."""
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, 6, 2, 8)) for key in (kq, kk, kv))
  ones = jnp.ones((1, 6), jnp.int32)
  c = jnp.array([1.7, 1.7])
  np.testing.assert_allclose(attention.attend(attention.scale_queries(q, c), k, v, ones),
                             reference_attention(1.7 * q, k, v, ones), atol=1e-5)


def reference_entropy(q, k):
  """-sum p log p of every causal softmax row, written out: [B, H, T]."""
  B, T, H, Dh = q.shape
  k = np.repeat(np.asarray(k, np.float64), H // k.shape[2], axis=2)
  logits = np.einsum('bqhd,bkhd->bhqk', np.asarray(q, np.float64), k) / np.sqrt(Dh)
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)


def test_uniform_attention_has_entropy_ln_i():
  """All-zero queries attend uniformly: entropy at 1-based position i is exactly ln i."""
  k = jax.random.normal(jax.random.key(2), (2, 37, 2, 8))
  q = jnp.zeros((2, 37, 4, 8))
  _, entropy = attention.attend_chunked(q, k, k, query_chunk=8)
  assert entropy.shape == (2, 4, 37) and entropy.dtype == jnp.float32
  np.testing.assert_allclose(entropy, np.broadcast_to(np.log(np.arange(1, 38)), (2, 4, 37)), rtol=1e-6, atol=1e-6)


def test_entropy_of_a_hand_computed_row():
  """Position 1 sees two keys with logits 0 and ln 3: p = (1/4, 3/4)."""
  q = jnp.ones((1, 2, 1, 1))
  k = jnp.array([0.0, np.log(3.0)]).reshape(1, 2, 1, 1)
  _, entropy = attention.attend_chunked(q, k, k, query_chunk=1)
  np.testing.assert_allclose(entropy[0, 0], [0.0, -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))], atol=1e-6)


def test_chunked_attention_equals_unchunked_with_gqa():
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = 2 * jax.random.normal(kq, (2, 13, 4, 16))
  k = jax.random.normal(kk, (2, 13, 2, 16))
  v = jax.random.normal(kv, (2, 13, 2, 16))
  expected = attention.attend(q, k, v)
  for chunk in (3, 16):  # Not dividing T; more than T.
    y, entropy = attention.attend_chunked(q, k, v, query_chunk=chunk)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(entropy, reference_entropy(q, k), atol=1e-5)
  y, entropy = attention.attend_chunked(q, k, v, query_chunk=3, with_entropy=False)
  assert entropy is None
  np.testing.assert_allclose(y, expected, atol=1e-5)


def test_attend_rows_ignores_cache_entries_past_each_query():
  """A query at position p reads keys 0..p only, whatever the cache holds after p."""
  kq, kk, kv = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(kq, (2, 1, 4, 8))
  k = jax.random.normal(kk, (2, 10, 2, 8))
  v = jax.random.normal(kv, (2, 10, 2, 8))
  positions = jnp.array([[3], [6]])
  attend_rows = jax.jit(lambda q, k, v: attention.attend_rows(q, k, v, positions)[0])
  y = attend_rows(q, k, v)
  junk_k = k.at[0, 4:].set(100.0).at[1, 7:].set(100.0)
  junk_v = v.at[0, 4:].set(1e4).at[1, 7:].set(1e4)
  np.testing.assert_allclose(attend_rows(q, junk_k, junk_v), y, atol=1e-6)
  for b, p in enumerate([3, 6]):  # Written out: head h reads kv head h // 2.
    for h in range(4):
      logits = np.asarray(k[b, :p + 1, h // 2]) @ np.asarray(q[b, 0, h]) / np.sqrt(8)
      weights = np.exp(logits - logits.max())
      np.testing.assert_allclose(y[b, 0, h], weights / weights.sum() @ np.asarray(v[b, :p + 1, h // 2]), atol=1e-5)


def test_write_cache_writes_each_row_at_its_own_index():
  cache = jnp.zeros((2, 5, 1, 2))
  new = jnp.array([[[1.0, 2.0]], [[3.0, 4.0]]])
  written = attention.write_cache(cache, new, jnp.array([1, 4]))
  np.testing.assert_array_equal(written[0, 1], new[0])
  np.testing.assert_array_equal(written[1, 4], new[1])
  assert float(jnp.abs(written).sum()) == 10.0


# ---------------------------------------------------------------------------------------------
# The kernels behind model.attention_impl: each against the reference ('xla').

KERNEL_CASES = [  # (kernel, heads, kv heads, length, block, dtype)
    ('chunked', 32, 4, 100, 32, jnp.float32),  # 100 is no multiple of 32.
    ('chunked', 4, 4, 37, 16, jnp.float32),
    ('chunked', 32, 4, 100, 32, jnp.bfloat16),
    ('chunked', 4, 4, 37, 512, jnp.bfloat16),  # One block longer than the sequence.
    ('splash', 32, 4, 150, 128, jnp.float32),  # Pallas interpret mode; 150 pads to 256.
    ('splash', 4, 4, 37, 512, jnp.bfloat16),
]


def packed_inputs(heads, kv_heads, length, dtype, head_dim=16, batch=2):
  """Random q, k, v, temperatures and segment ids of several packed documents per row."""
  kq, kk, kv, ks, kt = jax.random.split(jax.random.key(7), 5)
  q = jax.random.normal(kq, (batch, length, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, length, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, length, kv_heads, head_dim), dtype)
  temperature = jax.random.uniform(kt, (heads,), jnp.float32, 1.0, 2.0)
  starts = jax.random.bernoulli(ks, 0.06, (batch, length)).at[:, 0].set(True)
  return q, k, v, temperature, jnp.cumsum(starts, axis=1).astype(jnp.int32)


def attention_loss(kernel, segment_ids, weights, block):
  """A scalar of the attention output that reaches q, k, v and the temperatures."""
  def loss(q, k, v, temperature):
    y = attention.attend(attention.scale_queries(q, temperature), k, v, segment_ids, kernel, block)
    return jnp.sum(y.astype(jnp.float32) * weights)
  return loss


def assert_close(actual, expected, rtol):
  """Within rtol of the reference's largest magnitude, element by element."""
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  np.testing.assert_allclose(actual, expected, atol=rtol * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize('kernel,heads,kv_heads,length,block,dtype', KERNEL_CASES)
def test_kernel_matches_xla_in_outputs_and_gradients(kernel, heads, kv_heads, length, block, dtype):
  q, k, v, temperature, segment_ids = packed_inputs(heads, kv_heads, length, dtype)
  assert int(segment_ids.max()) > 2  # Several documents per row: the segment mask matters.
  rtol = 1e-5 if dtype == jnp.float32 else 2e-2
  scaled = attention.scale_queries(q, temperature)
  expected = attention.attend(scaled, k, v, segment_ids, 'xla')
  assert_close(jax.jit(lambda *a: attention.attend(*a, segment_ids, kernel, block))(scaled, k, v), expected, rtol)
  weights = jax.random.normal(jax.random.key(8), expected.shape, jnp.float32)
  grads = jax.jit(jax.grad(attention_loss(kernel, segment_ids, weights, block), argnums=(0, 1, 2, 3)))
  reference = jax.grad(attention_loss('xla', segment_ids, weights, block), argnums=(0, 1, 2, 3))
  for name, got, want in zip(('q', 'k', 'v', 'temperature'), grads(q, k, v, temperature), reference(q, k, v, temperature)):
    assert got.dtype == want.dtype, name
    assert_close(got, want, rtol)


def test_a_bias_on_the_logits_is_the_same_in_every_kernel_with_its_gradients():
  """ALiBi's bias from packed positions: xla adds it to the [T, T] logits, chunked per block (with the
  gradient of the bias's own parameters, here the slopes, through the custom VJP), attend_rows per
  query chunk; a reference adds the bias written out."""
  q, k, v, _, segment_ids = packed_inputs(4, 2, 37, jnp.float32)
  starts = segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
  index = jnp.broadcast_to(jnp.arange(37), (2, 37))
  positions_BxT = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # Restart at each document.
  slopes = positions.alibi_slopes(4)
  i, j = np.asarray(positions_BxT)[:, :, None], np.asarray(positions_BxT)[:, None, :]
  written_out = -np.asarray(slopes)[None, :, None, None] * (i - j)[:, None]
  assert written_out[np.broadcast_to((i >= j)[:, None], written_out.shape)].max() <= 0
  weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

  def loss(kernel, q, k, v, slopes):
    y = attention.attend(q, k, v, segment_ids, kernel, 16, positions_BxT=positions_BxT,
                         bias=(positions.alibi_bias, slopes))
    return jnp.sum(y * weights), y

  (_, y_xla), grads_xla = jax.value_and_grad(functools.partial(loss, 'xla'), argnums=(0, 1, 2, 3), has_aux=True)(
      q, k, v, slopes)
  (_, y_chunked), grads_chunked = jax.jit(jax.value_and_grad(functools.partial(loss, 'chunked'), argnums=(0, 1, 2, 3),
                                                             has_aux=True))(q, k, v, slopes)
  expected = jax.nn.dot_product_attention(q, k, v, bias=jnp.asarray(written_out, jnp.float32),
                                          mask=attention.segment_mask(segment_ids), is_causal=True)
  assert_close(y_xla, expected, 1e-5)
  assert_close(y_chunked, expected, 1e-5)
  assert float(jnp.abs(grads_xla[3]).max()) > 0
  for name, got, want in zip(('q', 'k', 'v', 'slopes'), grads_chunked, grads_xla):
    assert_close(got, want, 1e-4)
  # The long path: one document per row, positions 0 .. T-1.
  y_rows, _ = attention.attend_chunked(q, k, v, 8, with_entropy=False, bias=(positions.alibi_bias, slopes))
  assert_close(y_rows, attention.attend(q, k, v, None, 'chunked', 16, bias=(positions.alibi_bias, slopes)), 1e-5)


def test_chunked_leaves_out_key_and_value_gradients_nobody_asks_for():
  """The temperature search's first layer: only q (through its temperature) is differentiated. The
  chunked backward then computes dq alone, equal to the full backward's, with two of its four block
  products gone from the compiled gradient."""
  q, k, v, _, segment_ids = packed_inputs(4, 2, 64, jnp.float32)
  weights = jax.random.normal(jax.random.key(10), q.shape, jnp.float32)

  def loss(q, k, v):
    return jnp.sum(attention.attend(q, k, v, segment_ids, 'chunked', 16) * weights)

  q_only = jax.jit(jax.grad(loss))
  assert_close(q_only(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)[0], 1e-6)
  dots = {name: jax.jit(grad).lower(q, k, v).as_text().count('dot_general')
          for name, grad in (('q', jax.grad(loss)), ('qkv', jax.grad(loss, argnums=(0, 1, 2))))}
  assert dots['qkv'] - dots['q'] == 2, dots


def test_chunked_without_segments_is_plain_causal_attention():
  q, k, v, _, _ = packed_inputs(8, 2, 45, jnp.float32)
  assert_close(attention.attend(q, k, v, None, 'chunked', 16), reference_attention(q, k, v, jnp.ones((2, 45))), 1e-5)


def test_splash_runs_sharded_over_the_mesh():
  """Rows over ('data', 'fsdp') and heads over 'tensor', each device running the kernel on its share."""
  q, k, v, _, segment_ids = packed_inputs(4, 2, 40, jnp.float32, batch=4)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (('batch', ('data', 'fsdp')), ('heads', 'tensor'), ('kv_heads', 'tensor'))
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda q, k, v: attention.attend(q, k, v, segment_ids, 'splash', 128, rules=rules)).lower(q, k, v)
    assert 'shard_map' in lowered.as_text() or 'sdy.manual_computation' in lowered.as_text()
    y = lowered.compile()(q, k, v)
  assert_close(y, attention.attend(q, k, v, segment_ids, 'xla'), 1e-5)


def test_chunked_gradient_memory_grows_linearly_with_length():
  """XLA's temporaries for the chunked kernel's gradient: 4x the length costs about 4x, not 16x,
  and far less than one [T, T] float32 logits matrix per head at 4K."""
  def temp_bytes(length):
    q = jax.ShapeDtypeStruct((1, length, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, None, 'chunked', 128))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
  small, large = temp_bytes(1024), temp_bytes(4096)
  assert large < 4.5 * small
  assert large < 4096 * 4096 * 4  # One head's logits alone would be 64 MiB.


def test_auto_picks_the_kernel_by_platform_shape_and_dtype():
  choose = functools.partial(attention.choose, 'auto', seq_len=4096, head_dim=64, chunked_from=2048)
  assert choose(platform='tpu', dtype=jnp.float32, has_segments=True)[0] == 'splash'
  assert choose(platform='gpu', dtype=jnp.bfloat16, has_segments=False)[0] == 'cudnn'
  kernel, reason = choose(platform='gpu', dtype=jnp.float32, has_segments=False)
  assert kernel == 'chunked' and 'bfloat16' in reason
  kernel, reason = choose(platform='gpu', dtype=jnp.bfloat16, has_segments=True)
  assert kernel == 'chunked' and 'packed documents' in reason
  assert choose(platform='cpu', dtype=jnp.float32, has_segments=True)[0] == 'chunked'
  kernel, reason = attention.choose('auto', 'cpu', 256, jnp.float32, 64, True, 2048)
  assert kernel == 'xla' and '256 tokens < model.attention_chunked_from=2048' in reason
  assert attention.choose('chunked', 'tpu', 8, jnp.float32, 64, True, 2048)[0] == 'chunked'  # Explicit wins.
  kernel, reason = choose(platform='tpu', dtype=jnp.float32, has_segments=True, has_bias=True)
  assert kernel == 'chunked' and 'no bias' in reason  # ALiBi: splash takes no bias.


def test_the_default_block_is_64_for_chunked_on_cpu_and_512_elsewhere(monkeypatch):
  assert attention.default_block('chunked', 'cpu') == 64
  assert attention.default_block('chunked', 'gpu') == attention.default_block('splash', 'tpu') == 512
  cfg = base.get_config()
  cfg.data.seq_len = 256  # The defaults: chunked from 256 tokens on CPU.
  assert attention.kernel_for_run(cfg, 'cpu')[0] == 'chunked'
  blocks = []
  monkeypatch.setattr(attention, 'flash_attention', lambda *args: blocks.append(args[4]) or args[0])
  q = jnp.zeros((1, 256, 2, 8))
  attention.attend(q, q, q, implementation='auto')  # block_size 0: the kernel's own.
  attention.attend(q, q, q, implementation='chunked', block_size=32)
  assert blocks == [64, 32]


def test_cudnn_is_refused_off_gpu_with_a_sentence():
  cfg = base.get_config()
  cfg.model.attention_impl = 'cudnn'
  cfg.model.dtype = 'bfloat16'
  cfg.data.separate_documents = False
  with pytest.raises(ConfigError, match="needs a GPU but this run's devices are cpu"):
    attention.kernel_for_run(cfg, 'cpu')
  assert attention.kernel_for_run(cfg, 'gpu')[0] == 'cudnn'
  cfg.model.attention_impl = 'splash'
  assert 'interpreted on cpu' in attention.kernel_for_run(cfg, 'cpu')[1]


def test_splash_gradient_compiles_for_a_tpu_slice():
  """Compiled, not run: XLA for a v5e 2x2 slice (libtpu's topology description) takes the Pallas kernel."""
  from jax.experimental import topologies
  topology = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2', chip_config_name='default',
                                          chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = jax.sharding.Mesh(np.array(topology.devices).reshape(2, 2, 1), ('data', 'fsdp', 'tensor'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (('batch', ('data', 'fsdp')), ('heads', 'tensor'), ('kv_heads', 'tensor'))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  q = jax.ShapeDtypeStruct((4, 1000, 8, 64), jnp.bfloat16, sharding=rows)
  kv = jax.ShapeDtypeStruct((4, 1000, 2, 64), jnp.bfloat16, sharding=rows)
  segment_ids = jax.ShapeDtypeStruct((4, 1000), jnp.int32, sharding=rows)
  loss = lambda q, k, v, s: jnp.sum(attention.attend(q, k, v, s, 'auto', 512, rules=rules).astype(jnp.float32))
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segment_ids).compile()
  assert 'tpu_custom_call' in compiled.as_text()  # The Mosaic kernels, forward and backward.
  assert compiled.memory_analysis().temp_size_in_bytes < 1000 * 1000 * 8 * 4  # No [T, T] logits per head.


def test_query_temperatures_follow_each_schedules_formula():
  positions_1xT = jnp.arange(40)[None]  # 1-based i = 1 .. 40
  i = np.arange(1, 41, dtype=np.float64)[:, None]
  c, a = jnp.array([1.5, 0.8]), jnp.array([0.3, -0.1])
  np.testing.assert_array_equal(attention.query_temperatures('constant', positions_1xT, 16, c)[0, 0], c)
  log = attention.query_temperatures('log', positions_1xT, 16, c, a)[0]
  expected = np.where(i <= 16, 1.0, np.asarray(c) + np.asarray(a) * np.log(i / 16))
  np.testing.assert_allclose(log, expected, rtol=1e-6)
  assert np.all(np.asarray(log[:16]) == 1.0)  # Exactly 1 within L: the base model there.
  ssmax = attention.query_temperatures('ssmax', positions_1xT, 16, c)[0]
  np.testing.assert_allclose(ssmax, np.asarray(c) * np.log(i), rtol=1e-6, atol=1e-7)


def test_log_schedule_with_octaves_is_a_ramp_linear_in_ln_i_within_each_octave():
  positions_1xT = jnp.arange(160)[None]  # i = 1 .. 160 with L = 16: octaves 16-32, 32-64, 64-160.
  i = np.arange(1, 161, dtype=np.float64)[:, None]
  c, a_KxH = jnp.array([1.5, 0.8]), jnp.array([[0.3, -0.1], [0.5, 0.2], [-0.4, 0.7]])
  ramp = attention.query_temperatures('log', positions_1xT, 16, c, a_KxH)[0]
  u, ln2 = np.log(i / 16), np.log(2.0)
  expected = (np.asarray(c) + np.clip(u, 0, ln2) * np.asarray(a_KxH[0]) + np.clip(u - ln2, 0, ln2) * np.asarray(a_KxH[1])
              + np.maximum(u - 2 * ln2, 0) * np.asarray(a_KxH[2]))
  np.testing.assert_allclose(ramp, np.where(i <= 16, 1.0, expected), rtol=1e-5)
  assert np.all(np.asarray(ramp[:16]) == 1.0)
  # One octave ([1, H]) is the log form itself, unclipped all the way out.
  np.testing.assert_allclose(attention.query_temperatures('log', positions_1xT, 16, c, a_KxH[:1]),
                             attention.query_temperatures('log', positions_1xT, 16, c, a_KxH[0]), rtol=1e-6)


def test_log_schedule_with_step_octaves_holds_one_value_per_octave():
  positions_1xT = jnp.arange(160)[None]  # i = 1 .. 160 with L = 16: octaves 17-32, 33-64, 65 onwards.
  c, a_KxH = jnp.array([1.5, 0.8]), jnp.array([[0.3, -0.1], [0.5, 0.2], [-0.4, 0.7]])
  step = np.asarray(attention.query_temperatures('log', positions_1xT, 16, c, a_KxH, 'step')[0])
  octave_T = np.digitize(np.arange(1, 161), [16, 32, 64], right=True) - 1  # -1 within L; i = 32 is octave 0.
  expected = np.where(octave_T[:, None] < 0, 1.0, np.asarray(c) + np.asarray(a_KxH)[octave_T.clip(0)])
  np.testing.assert_allclose(step, expected, rtol=1e-6)
  assert np.all(step[:16] == 1.0) and np.all(step[159] == step[64])  # The last octave goes on unchanged.
