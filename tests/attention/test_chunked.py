"""Tests of nopejax/attention/chunked.py: the plain-JAX flash attention kernel and its custom VJP."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nopejax import attention, positions
from tests.attention.reference import (assert_close, assert_kernel_matches_xla_in_outputs_and_gradients, packed_inputs,
                                       reference_attention)

CHUNKED_CASES = [  # (heads, kv heads, length, block, dtype)
    (32, 4, 100, 32, jnp.float32),  # 100 is no multiple of 32.
    (4, 4, 37, 16, jnp.float32),
    (32, 4, 100, 32, jnp.bfloat16),
    (4, 4, 37, 512, jnp.bfloat16),  # One block longer than the sequence.
]


@pytest.mark.parametrize('heads,kv_heads,length,block,dtype', CHUNKED_CASES)
def test_chunked_matches_xla_in_outputs_and_gradients(heads, kv_heads, length, block, dtype):
  assert_kernel_matches_xla_in_outputs_and_gradients('chunked', heads, kv_heads, length, block, dtype)


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
