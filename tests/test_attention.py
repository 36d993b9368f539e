import jax
import jax.numpy as jnp
import numpy as np

from nopejax import attention


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
