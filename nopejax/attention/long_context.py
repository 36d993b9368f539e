"""Long-context attention: evaluation at many times the training length, and cached decoding.

Queries are processed a chunk at a time, so only one chunk's [heads, chunk, keys] softmax exists at
once: memory grows linearly with the length, not with its square.
"""
import jax
import jax.numpy as jnp


def attend_rows(q_BxCxHxDh, k_BxSxKxDh, v_BxSxKxDh, positions_BxC, with_entropy=True, bias=None):
  """Causal attention of C queries over S keys, in float32; query at position p sees keys 0..p.

  Returns (y_BxCxHxDh in v's dtype, entropy_BxHxC in nats or None). Keys past a query's
  position are masked, so a KV cache may hold anything there. Head h reads kv head h // (H/K),
  as jax.nn.dot_product_attention does. `bias` as in `attend`, keys at positions 0 .. S-1.
  """
  B, C, H, Dh = q_BxCxHxDh.shape
  S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  q_BxCxKxGxDh = q_BxCxHxDh.astype(jnp.float32).reshape(B, C, K, H // K, Dh) / jnp.sqrt(jnp.float32(Dh))
  logits_BxKxGxCxS = jnp.einsum('bckgd,bskd->bkgcs', q_BxCxKxGxDh, k_BxSxKxDh.astype(jnp.float32),
                                precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    fn, params = bias
    bias_BxHxCxS = fn(params, positions_BxC, jnp.broadcast_to(jnp.arange(S), (B, S)))
    logits_BxKxGxCxS = logits_BxKxGxCxS + bias_BxHxCxS.reshape(B, K, H // K, C, S)
  visible_Bx1x1xCxS = (jnp.arange(S)[None, None, :] <= positions_BxC[:, :, None])[:, None, None]
  logits_BxKxGxCxS = jnp.where(visible_Bx1x1xCxS, logits_BxKxGxCxS, -jnp.inf)
  # Key 0 is visible to every query, so the row maximum is finite.
  shifted_BxKxGxCxS = logits_BxKxGxCxS - jnp.max(logits_BxKxGxCxS, axis=-1, keepdims=True)
  weights_BxKxGxCxS = jnp.exp(shifted_BxKxGxCxS)  # exp(-inf) = 0 where masked.
  total_BxKxGxC = jnp.sum(weights_BxKxGxCxS, axis=-1)
  probs_BxKxGxCxS = weights_BxKxGxCxS / total_BxKxGxC[..., None]
  y_BxCxKxGxDh = jnp.einsum('bkgcs,bskd->bckgd', probs_BxKxGxCxS, v_BxSxKxDh.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
  y_BxCxHxDh = y_BxCxKxGxDh.reshape(B, C, H, Dh).astype(v_BxSxKxDh.dtype)
  if not with_entropy:
    return y_BxCxHxDh, None
  # -sum p log p with log p = shifted - log(total); masked keys (p = 0) contribute nothing.
  p_times_shifted_BxKxGxC = jnp.sum(
      jnp.where(visible_Bx1x1xCxS, probs_BxKxGxCxS * shifted_BxKxGxCxS, 0.0), axis=-1)
  entropy_BxKxGxC = jnp.log(total_BxKxGxC) - p_times_shifted_BxKxGxC
  return y_BxCxHxDh, entropy_BxKxGxC.reshape(B, H, C)


def attend_chunked(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, query_chunk, with_entropy=True, bias=None):
  """Causal self-attention `query_chunk` queries at a time (jax.lax.map over chunks), in float32.

  Same result as `attend` without segments; also returns the attention entropy of every head at
  every query position (entropy_BxHxT, nats) when `with_entropy`, else None.
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  C = min(query_chunk, T)
  num_chunks = -(-T // C)
  # Padded queries (past T) see every key; their rows are dropped below.
  q_BxPxHxDh = jnp.pad(q_BxTxHxDh, ((0, 0), (0, num_chunks * C - T), (0, 0), (0, 0)))
  q_NxBxCxHxDh = q_BxPxHxDh.reshape(B, num_chunks, C, H, Dh).swapaxes(0, 1)
  positions_NxC = jnp.arange(num_chunks * C).reshape(num_chunks, C)

  def one_chunk(chunk):
    q_BxCxHxDh, positions_C = chunk
    positions_BxC = jnp.broadcast_to(positions_C, (B, C))
    return attend_rows(q_BxCxHxDh, k_BxTxKxDh, v_BxTxKxDh, positions_BxC, with_entropy, bias)

  y_NxBxCxHxDh, entropy_NxBxHxC = jax.lax.map(one_chunk, (q_NxBxCxHxDh, positions_NxC))
  y_BxTxHxDh = y_NxBxCxHxDh.swapaxes(0, 1).reshape(B, num_chunks * C, H, Dh)[:, :T]
  if entropy_NxBxHxC is None:
    return y_BxTxHxDh, None
  entropy_BxHxT = entropy_NxBxHxC.transpose(1, 2, 0, 3).reshape(B, H, num_chunks * C)[:, :, :T]
  return y_BxTxHxDh, entropy_BxHxT


def write_cache(cache_BxSxKxDh, new_BxKxDh, index_B):
  """The cache with row b's entry at position index_B[b] replaced by new_BxKxDh[b]."""
  return cache_BxSxKxDh.at[jnp.arange(cache_BxSxKxDh.shape[0]), index_B].set(
      new_BxKxDh.astype(cache_BxSxKxDh.dtype))
