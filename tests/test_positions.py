import jax
import jax.numpy as jnp
import numpy as np

from nopejax import positions


def test_inverse_frequencies_follow_the_formula():
  for head_dim, theta in ((16, 10000.0), (64, 500000.0)):
    m = np.arange(head_dim // 2)
    np.testing.assert_allclose(positions.rope_inverse_frequencies(head_dim, theta),
                               theta ** (-2.0 * m / head_dim), rtol=1e-6)


def test_rotation_is_llamas_rotate_half_as_complex_multiplication():
  """Dims (m, m + Dh/2) are the real and imaginary parts of z_m, turned by e^{i p theta_m}."""
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3, 8)), np.float64)
  p = np.array([[0, 1, 2, 7, 100], [3, 3, 9, 40, 1000]])
  inverse_frequencies = 1000.0 ** (-np.arange(4) * 2 / 8)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * p[:, :, None, None] * inverse_frequencies)
  expected = np.concatenate([z.real, z.imag], axis=-1)
  rotated = positions.rotate(jnp.asarray(x, jnp.float32), jnp.asarray(p), jnp.asarray(inverse_frequencies, jnp.float32))
  np.testing.assert_allclose(rotated, expected, atol=2e-4)  # float32 angles at position 1000.
  np.testing.assert_allclose(rotated[:, :1][p[:, :1] == 0], x[:, :1][p[:, :1] == 0], atol=1e-6)  # Position 0: identity.


def test_rope_logits_depend_only_on_the_position_difference():
  q = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))
  k = jax.random.normal(jax.random.key(2), (1, 1, 2, 16))

  def logit(i, j):
    q_i, k_j = positions.apply('rope', 10000.0, q, k, jnp.array([[i]]))[0], positions.apply('rope', 10000.0, q, k, jnp.array([[j]]))[1]
    return jnp.sum(q_i * k_j, axis=-1)

  for i, j, shift in ((5, 2, 11), (9, 9, 300), (30, 0, 7)):
    np.testing.assert_allclose(logit(i, j), logit(i + shift, j + shift), atol=2e-5)
  assert not np.allclose(logit(5, 2), logit(5, 3), atol=1e-3)  # The difference itself matters.


def test_nope_leaves_q_and_k_alone():
  q, k = jnp.ones((1, 3, 2, 4)), jnp.full((1, 3, 1, 4), 2.0)
  q_out, k_out = positions.apply('nope', 10000.0, q, k, jnp.zeros((1, 3), jnp.int32))
  assert q_out is q and k_out is k
