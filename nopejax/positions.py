"""Position encodings as small pure functions of q, k and token positions (pe_methods.md).

NoPE uses none: the causal mask is the only source of position. RoPE rotates each pair of head
dimensions (m, m + Dh/2) of q and k by the angle position * inverse_frequency[m], Llama's
"rotate_half" layout, so q_i . k_j depends on i - j only. Scalings of RoPE change the inverse
frequencies (or the positions); they plug in here, before `rotate`.
"""
import jax.numpy as jnp


def rope_inverse_frequencies(head_dim: int, theta: float):
  """theta^(-2m / head_dim) for m = 0 .. head_dim/2 - 1, float32 [head_dim // 2] (as Llama computes them)."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (jnp.float32(theta) ** exponents)


def rotate(x_BxTxHxDh, positions_BxT, inverse_frequencies_F):
  """x rotated by its tokens' positions, rotate-half layout: dims m and m + Dh/2 form one pair.

  The angles and the rotation are computed in float32, the result has x's dtype. Rotating q and
  k with the same positions makes their dot product a function of the position difference.
  """
  angles_BxTxF = positions_BxT.astype(jnp.float32)[:, :, None] * inverse_frequencies_F
  cos_BxTx1xDh = jnp.cos(jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1))[:, :, None, :]
  sin_BxTx1xDh = jnp.sin(jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1))[:, :, None, :]
  x = x_BxTxHxDh.astype(jnp.float32)
  first, second = jnp.split(x, 2, axis=-1)
  rotated_half = jnp.concatenate([-second, first], axis=-1)
  return (x * cos_BxTx1xDh + rotated_half * sin_BxTx1xDh).astype(x_BxTxHxDh.dtype)


def apply(position: str, rope_theta: float, q_BxTxHxDh, k_BxTxKxDh, positions_BxT):
  """q and k with `model.position`'s encoding applied ('nope': unchanged)."""
  if position == 'nope':
    return q_BxTxHxDh, k_BxTxKxDh
  if position == 'rope':
    inverse_frequencies_F = rope_inverse_frequencies(q_BxTxHxDh.shape[-1], rope_theta)
    return (rotate(q_BxTxHxDh, positions_BxT, inverse_frequencies_F),
            rotate(k_BxTxKxDh, positions_BxT, inverse_frequencies_F))
  raise ValueError(f'unknown position encoding {position!r}')
