"""Next-token cross-entropy, whole or a chunk of positions at a time with its own gradient.

The output projection's float32 logits ([B, T, V]) and their gradient are the largest arrays of a
train step with a big vocabulary. `chunked_cross_entropy` forms them `chunk` positions at a time:
the forward pass keeps only each token's log-normalizer, and the backward pass recomputes one
chunk's logits, turns them into that chunk's gradient (softmax minus one-hot) and pulls it back
through the projection before the next chunk, so neither exists for the whole batch.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import SymbolicZero

from nopejax import sharding


def cross_entropy(logits_BxTxV, targets_BxT, weights_BxT):
  """Sum of next-token losses times their weights (a 0/1 mask, or length weights), and the weights' sum."""
  losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  return jnp.sum(losses_BxT * weights_BxT), jnp.sum(weights_BxT)


def _chunks(a_BxT___, chunk):
  """[B, T, ...] -> [T / chunk, B, chunk, ...]: the scan's leading axis, batch sharding kept."""
  B, T = a_BxT___.shape[:2]
  return a_BxT___.reshape(B, T // chunk, chunk, *a_BxT___.shape[2:]).swapaxes(0, 1)


def _logits(x_BxCxD, w_DxV, rules):
  """Float32 logits of one chunk, accumulated in float32 from the model's dtype."""
  B, C, D = x_BxCxD.shape
  # Pinned as whole-batch activations and logits are, so the partitioner splits every chunk alike.
  x_BxCxD = sharding.constrain(x_BxCxD, ('batch', 'seq', 'act_embed'), rules)
  # One 2-D matmul (model.project says why).
  logits_NxV = jnp.matmul(x_BxCxD.reshape(B * C, D), w_DxV, preferred_element_type=jnp.float32)
  return sharding.constrain(logits_NxV.reshape(B, C, -1), ('batch', 'seq', 'vocab'), rules)


def _target_logits(logits_BxCxV, targets_BxC):
  return jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def chunked_cross_entropy(x_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk, rules=()):
  """sum(weights * loss) of logits x @ w, `chunk` positions at a time (chunk divides T).

  x_BxTxD: the final-normed hidden states, w_DxV: the output projection, both in the model's dtype.
  """
  return _forward(x_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk, rules)[0]


def _forward(x_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk, rules):
  """(loss sum, log-normalizers lse_BxT)."""
  def chunk_sum(total, inputs):
    x_BxCxD, targets_BxC, weights_BxC = inputs
    logits_BxCxV = _logits(x_BxCxD, w_DxV, rules)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    losses_BxC = lse_BxC - _target_logits(logits_BxCxV, targets_BxC)
    return total + jnp.sum(losses_BxC * weights_BxC), lse_BxC

  inputs = (_chunks(x_BxTxD, chunk), _chunks(targets_BxT, chunk), _chunks(weights_BxT, chunk))
  total, lse_NxBxC = jax.lax.scan(chunk_sum, jnp.zeros((), jnp.float32), inputs)
  B, T = targets_BxT.shape
  return total, lse_NxBxC.swapaxes(0, 1).reshape(B, T)


def _fwd(x, w, targets, weights, chunk, rules):
  # symbolic_zeros: each argument arrives with `perturbed`, whether its gradient is wanted. The
  # search's frozen projection is not, so its gradient is never formed.
  total, lse_BxT = _forward(x.value, w.value, targets.value, weights.value, chunk, rules)
  wanted = (x.perturbed, w.perturbed, weights.perturbed)
  return total, (x.value, w.value, targets.value, weights.value, lse_BxT, wanted)


def _bwd(chunk, rules, residuals, g):
  x_BxTxD, w_DxV, targets_BxT, weights_BxT, lse_BxT, (want_x, want_w, want_weights) = residuals
  if isinstance(g, SymbolicZero) or not (want_x or want_w or want_weights):
    return None, None, None, None
  V = w_DxV.shape[1]

  def chunk_grads(dw_DxV, inputs):
    x_BxCxD, targets_BxC, weights_BxC, lse_BxC = inputs
    logits_BxCxV = _logits(x_BxCxD, w_DxV, rules)
    probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    is_target_BxCxV = jax.lax.broadcasted_iota(jnp.int32, probs_BxCxV.shape, 2) == targets_BxC[..., None]
    # d loss / d logits = softmax - one-hot, per token times its weight; in the model's dtype for
    # the matmuls, as autodiff of x @ w in that dtype would give it.
    dlogits_BxCxV = (jnp.where(is_target_BxCxV, probs_BxCxV - 1.0, probs_BxCxV) * (g * weights_BxC)[..., None])
    dlogits_BxCxV = sharding.constrain(dlogits_BxCxV.astype(x_BxCxD.dtype), ('batch', 'seq', 'vocab'), rules)
    B, C, D = x_BxCxD.shape
    dlogits_NxV = dlogits_BxCxV.reshape(B * C, V)
    dx_BxCxD = (dlogits_NxV @ w_DxV.T).reshape(B, C, D) if want_x else None
    if want_w:
      # Split as the projection is: each chunk's sum over the batch is summed over the devices at
      # once and each keeps its part, so the accumulator is never a whole [D, V] float32 array (one
      # chunk's sum is, for the moment of the collective).
      dw_DxV = sharding.constrain(
          dw_DxV + jnp.matmul(x_BxCxD.reshape(B * C, D).T, dlogits_NxV, preferred_element_type=jnp.float32),
          ('embed', 'vocab'), rules)
    dweights_BxC = g * (lse_BxC - _target_logits(logits_BxCxV, targets_BxC)) if want_weights else None
    return dw_DxV, (dx_BxCxD, dweights_BxC)

  dw_DxV = sharding.constrain(jnp.zeros(w_DxV.shape, jnp.float32), ('embed', 'vocab'), rules) if want_w else None
  inputs = tuple(_chunks(a, chunk) for a in (x_BxTxD, targets_BxT, weights_BxT, lse_BxT))
  dw_DxV, (dx_NxBxCxD, dweights_NxBxC) = jax.lax.scan(chunk_grads, dw_DxV, inputs)
  unchunk = lambda a_NxBxC___: None if a_NxBxC___ is None else a_NxBxC___.swapaxes(0, 1).reshape(
      targets_BxT.shape + a_NxBxC___.shape[3:])
  return unchunk(dx_NxBxCxD), None if dw_DxV is None else dw_DxV.astype(w_DxV.dtype), None, unchunk(dweights_NxBxC)


chunked_cross_entropy.defvjp(_fwd, _bwd, symbolic_zeros=True)
