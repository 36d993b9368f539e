"""One attention core: the per-head temperature scales q, then an ordinary softmax attention runs.

Scaling q (not the logits, not k) keeps any fused attention kernel usable unchanged and leaves
cached keys unscaled; q * c_h then the usual 1/sqrt(d) gives logits * c_h / sqrt(d).
"""
import jax
import jax.numpy as jnp


def scale_queries(q_BxTxHxDh, temperature_H):
  """q * c_h per head, multiplied in float32 so a bf16 model still trains float32 temperatures."""
  return (q_BxTxHxDh.astype(jnp.float32) * temperature_H[None, None, :, None]).astype(q_BxTxHxDh.dtype)


def segment_mask(segment_ids_BxT):
  """[B, 1, T, T] True where query and key are in the same packed document."""
  return segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]


def attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT=None, implementation='xla'):
  """Causal attention with grouped-query heads (K divides H); documents masked apart by segment ids."""
  mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT)
  return jax.nn.dot_product_attention(
      q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask=mask, is_causal=True, implementation=implementation)
