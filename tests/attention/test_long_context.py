"""Tests of nopejax/attention/long_context.py: attention a query chunk at a time, its entropies, and the KV cache."""
import jax
import jax.numpy as jnp
import numpy as np

from nopejax import attention


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
