"""Reference attention, packed inputs and comparisons shared by the attention kernel tests."""
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


def assert_kernel_matches_xla_in_outputs_and_gradients(kernel, heads, kv_heads, length, block, dtype):
  """`kernel` against the reference ('xla') on packed documents: the output and the gradients of q, k, v
  and the temperatures."""
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
