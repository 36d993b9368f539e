"""The decoder: Llama-style blocks (RMSNorm, grouped-query attention, SwiGLU); no position encoding
by default, or RoPE (`model.position`), applied to q and k before the attention kernel.

Every parameter names its logical axes (`axes=`) so sharding.py can place it on any mesh.
Each attention layer owns a float32 `Temperature` of shape [num_heads], the multiplier c_h on q
(with `model.temperature_schedule`, a function of the query's position too: attention.query_temperatures).
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nopejax import attention, config, positions, sharding


class Temperature(nnx.Param):
  """Per-head multiplier on q. Its own variable type so the optimizer can train it alone or not at all."""


class TemperatureSlope(Temperature):
  """The log schedule's a_h: trains with the temperatures, but a uniform c (set_temperatures) leaves it."""


def _normal(rngs, shape, axes, std):
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim, eps):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=('norm',))
    self.eps = eps

  def __call__(self, x_BxTxD):
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(x_BxTxD.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg, rngs):
    m = cfg.model
    D, H, K, Dh = m.embed_dim, m.num_heads, m.num_kv_heads, config.head_dim(cfg)
    self.q_DxHxDh = _normal(rngs, (D, H, Dh), ('embed', 'heads', 'head_dim'), m.init_std)
    self.k_DxKxDh = _normal(rngs, (D, K, Dh), ('embed', 'kv_heads', 'head_dim'), m.init_std)
    self.v_DxKxDh = _normal(rngs, (D, K, Dh), ('embed', 'kv_heads', 'head_dim'), m.init_std)
    self.o_HxDhxD = _normal(rngs, (H, Dh, D), ('heads', 'head_dim', 'embed'), m.init_std)
    # The schedule's parameters (attention.query_temperatures): c_h, with a_h for 'log'; s_h for 'ssmax',
    # starting where s_h ln(L) = model.temperature.
    self.schedule, self.schedule_length = m.temperature_schedule, config.temperature_length(cfg)
    start = m.temperature / math.log(self.schedule_length) if self.schedule == 'ssmax' else m.temperature
    self.temperature = Temperature(jnp.full((H,), start, jnp.float32), axes=('temperature',))
    if self.schedule == 'log':
      self.temperature_slope = TemperatureSlope(jnp.zeros((H,), jnp.float32), axes=('temperature',))
    self.dtype = jnp.dtype(m.dtype)
    self.rules = cfg.mesh.rules
    self.implementation = m.attention_impl
    self.block_size = m.attention_block
    self.chunked_from = m.attention_chunked_from
    self.position, self.rope_theta = m.position, float(m.rope_theta)

  def qkv(self, x_BxTxD, positions_BxT):
    """Projections, with the position encoding applied to q and k and the temperature to q."""
    dt = self.dtype
    q_BxTxHxDh = jnp.einsum('btd,dhk->bthk', x_BxTxD, self.q_DxHxDh[...].astype(dt))
    k_BxTxKxDh = jnp.einsum('btd,dhk->bthk', x_BxTxD, self.k_DxKxDh[...].astype(dt))
    v_BxTxKxDh = jnp.einsum('btd,dhk->bthk', x_BxTxD, self.v_DxKxDh[...].astype(dt))
    q_BxTxHxDh, k_BxTxKxDh = positions.apply(self.position, self.rope_theta, q_BxTxHxDh, k_BxTxKxDh, positions_BxT)
    slope_H = self.temperature_slope[...] if self.schedule == 'log' else None
    temperature_BxTxH = attention.query_temperatures(self.schedule, positions_BxT, self.schedule_length,
                                                     self.temperature[...], slope_H)
    q_BxTxHxDh = attention.scale_queries(q_BxTxHxDh, temperature_BxTxH)
    q_BxTxHxDh = sharding.constrain(q_BxTxHxDh, ('batch', 'seq', 'heads', 'head_dim'), self.rules)
    return q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh

  def out(self, y_BxTxHxDh):
    return jnp.einsum('bthk,hkd->btd', y_BxTxHxDh, self.o_HxDhxD[...].astype(self.dtype))

  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT):
    q, k, v = self.qkv(x_BxTxD, positions_BxT)
    return self.out(attention.attend(q, k, v, segment_ids_BxT, self.implementation, self.block_size,
                                     self.chunked_from, self.rules))

  def forward_chunked(self, x_BxTxD, query_chunk, with_entropy=False):
    """One sequence per row (no segments), `query_chunk` queries at a time: memory linear in T.

    Returns (out_BxTxD, entropy_BxHxT or None, k_BxTxKxDh, v_BxTxKxDh). The keys are unscaled (the
    temperature multiplies q only), so they can fill a KV cache that any temperature can read;
    with RoPE they are rotated by their positions 0 .. T-1, as the cache needs them.
    """
    positions_BxT = jnp.broadcast_to(jnp.arange(x_BxTxD.shape[1]), x_BxTxD.shape[:2])
    q, k, v = self.qkv(x_BxTxD, positions_BxT)
    y_BxTxHxDh, entropy_BxHxT = attention.attend_chunked(q, k, v, query_chunk, with_entropy)
    return self.out(y_BxTxHxDh), entropy_BxHxT, k, v

  def decode(self, x_Bx1xD, cache, index_B):
    """One new token per row at position index_B: its k, v go into the cache, then it attends.

    cache = {'k': k_BxSxKxDh, 'v': v_BxSxKxDh}; entries past a row's index are ignored.
    Returns (out_Bx1xD, updated cache).
    """
    q_Bx1xHxDh, k_Bx1xKxDh, v_Bx1xKxDh = self.qkv(x_Bx1xD, index_B[:, None])
    cache = {'k': attention.write_cache(cache['k'], k_Bx1xKxDh[:, 0], index_B),
             'v': attention.write_cache(cache['v'], v_Bx1xKxDh[:, 0], index_B)}
    y_Bx1xHxDh, _ = attention.attend_rows(q_Bx1xHxDh, cache['k'], cache['v'], index_B[:, None], with_entropy=False)
    return self.out(y_Bx1xHxDh), cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate x) * up x)."""

  def __init__(self, cfg, rngs):
    m = cfg.model
    self.gate_DxF = _normal(rngs, (m.embed_dim, m.mlp_dim), ('embed', 'mlp'), m.init_std)
    self.up_DxF = _normal(rngs, (m.embed_dim, m.mlp_dim), ('embed', 'mlp'), m.init_std)
    self.down_FxD = _normal(rngs, (m.mlp_dim, m.embed_dim), ('mlp', 'embed'), m.init_std)
    self.dtype = jnp.dtype(m.dtype)

  def __call__(self, x_BxTxD):
    dt = self.dtype
    gate_BxTxF = jax.nn.silu(x_BxTxD @ self.gate_DxF[...].astype(dt))
    return (gate_BxTxF * (x_BxTxD @ self.up_DxF[...].astype(dt))) @ self.down_FxD[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg, rngs):
    self.attention_norm = RMSNorm(cfg.model.embed_dim, cfg.model.norm_eps)
    self.attention = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.model.embed_dim, cfg.model.norm_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT):
    x_BxTxD = x_BxTxD + self.attention(self.attention_norm(x_BxTxD), segment_ids_BxT, positions_BxT)
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))

  def forward_chunked(self, x_BxTxD, query_chunk, with_entropy=False):
    """The block on the long-context path: (x_BxTxD, entropy_BxHxT or None, k, v); see Attention."""
    y_BxTxD, entropy_BxHxT, k, v = self.attention.forward_chunked(
        self.attention_norm(x_BxTxD), query_chunk, with_entropy)
    x_BxTxD = x_BxTxD + y_BxTxD
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), entropy_BxHxT, k, v

  def decode(self, x_Bx1xD, cache, index_B):
    """The block for one cached decoding step: (x_Bx1xD, updated cache)."""
    y_Bx1xD, cache = self.attention.decode(self.attention_norm(x_Bx1xD), cache, index_B)
    x_Bx1xD = x_Bx1xD + y_Bx1xD
    return x_Bx1xD + self.mlp(self.mlp_norm(x_Bx1xD)), cache


def _run_block(block, x_BxTxD, segment_ids_BxT, positions_BxT):
  return block(x_BxTxD, segment_ids_BxT, positions_BxT)


def _run_block_rematerialized(block, x_BxTxD, segment_ids_BxT, positions_BxT):
  """Runs a block under jax.checkpoint: its activations are recomputed in the backward pass.

  Plain jax.checkpoint over the block's split state, because nnx.remat writes variables back
  afterwards, which fails when the model was merged inside an outer jax.grad.
  """
  graphdef, block_state = nnx.split(block)

  def pure_block(block_state, x_BxTxD, segment_ids_BxT, positions_BxT):
    return nnx.merge(graphdef, block_state)(x_BxTxD, segment_ids_BxT, positions_BxT)

  return jax.checkpoint(pure_block)(block_state, x_BxTxD, segment_ids_BxT, positions_BxT)


class Transformer(nnx.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32."""

  def __init__(self, cfg, rngs):
    m = cfg.model
    self.embed_VxD = _normal(rngs, (m.vocab_size, m.embed_dim), ('vocab', 'embed'), m.init_std)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(m.num_layers)])
    self.final_norm = RMSNorm(m.embed_dim, m.norm_eps)
    if not m.tie_embeddings:  # Tied: the output projection is the embedding, transposed.
      self.head_DxV = _normal(rngs, (m.embed_dim, m.vocab_size), ('embed', 'vocab'), m.init_std)
    self.tie_embeddings = m.tie_embeddings
    self.dtype = jnp.dtype(m.dtype)
    self.rules = cfg.mesh.rules
    # Recomputing each block in the backward pass trades compute for activation memory.
    self.run_block = _run_block_rematerialized if m.remat else _run_block

  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
    """Packed documents: segment ids keep them apart, positions (default 0 .. T-1) place their tokens."""
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(self.dtype)
    for block in self.blocks:
      x_BxTxD = sharding.constrain(x_BxTxD, ('batch', 'seq', 'act_embed'), self.rules)
      x_BxTxD = self.run_block(block, x_BxTxD, segment_ids_BxT, positions_BxT)
    return self.head(x_BxTxD)

  # ------------------------------------------------------------------------------------------
  # Evaluation and decoding: one document per row, attention a query chunk at a time.

  def head(self, x_BxTxD):
    """Final norm and output projection of hidden states: logits_BxTxV, float32."""
    x_BxTxD = self.final_norm(x_BxTxD)
    head_DxV = self.embed_VxD[...].T if self.tie_embeddings else self.head_DxV[...]
    return jnp.einsum('btd,dv->btv', x_BxTxD, head_DxV.astype(self.dtype)).astype(jnp.float32)

  def _forward_chunked(self, tokens_BxT, query_chunk, with_entropy):
    x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(self.dtype)
    entropies, caches = [], []
    for block in self.blocks:
      x_BxTxD, entropy_BxHxT, k_BxTxKxDh, v_BxTxKxDh = block.forward_chunked(x_BxTxD, query_chunk, with_entropy)
      entropies.append(entropy_BxHxT)
      caches.append({'k': k_BxTxKxDh, 'v': v_BxTxKxDh})
    entropy_LxBxHxT = jnp.stack(entropies) if with_entropy else None
    return x_BxTxD, entropy_LxBxHxT, caches

  def forward_chunked(self, tokens_BxT, query_chunk, with_entropy=False):
    """Hidden states before the final norm (x_BxTxD; logits = head(x)) and, if asked, entropy_LxBxHxT.

    Causal, no segments, `query_chunk` queries at a time: nothing of size T^2 is formed, so
    memory grows linearly with T. Equals `__call__(tokens_BxT)` up to float rounding
    (attention runs in float32 here). The entropy is each layer's and head's attention entropy
    at each query position, in nats.
    """
    x_BxTxD, entropy_LxBxHxT, _ = self._forward_chunked(tokens_BxT, query_chunk, with_entropy)
    return x_BxTxD, entropy_LxBxHxT

  def prefill(self, tokens_BxT, cache_len, query_chunk):
    """Runs a prompt and returns (x_BxTxD as forward_chunked, KV cache of cache_len >= T positions).

    The cache is a list over layers of {'k': BxSxKxDh, 'v': BxSxKxDh}, unscaled keys. Rows may be
    right-padded: a row whose prompt has P < T tokens continues with decode(..., index P), which
    overwrites the padding's cache entries before any query can see them.
    """
    x_BxTxD, _, caches = self._forward_chunked(tokens_BxT, query_chunk, with_entropy=False)
    extra = cache_len - tokens_BxT.shape[1]
    caches = [{name: jnp.pad(c, ((0, 0), (0, extra), (0, 0), (0, 0))) for name, c in cache.items()}
              for cache in caches]
    return x_BxTxD, caches

  def decode(self, tokens_B, cache, index_B):
    """One greedy-decoding step: token b at position index_B[b] -> (logits_BxV float32, updated cache)."""
    x_Bx1xD = jnp.take(self.embed_VxD[...], tokens_B[:, None], axis=0).astype(self.dtype)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x_Bx1xD, layer_cache = block.decode(x_Bx1xD, layer_cache, index_B)
      new_cache.append(layer_cache)
    return self.head(x_Bx1xD)[:, 0], new_cache


def set_temperatures(state, value):
  """`state` with every temperature set to `value` (same shapes, dtypes and shardings): a uniform c.

  The log schedule's slopes a_h stay as they are (0 unless trained)."""
  def set_value(v):
    is_temperature = isinstance(v, Temperature) and not isinstance(v, TemperatureSlope)
    return v.replace(jnp.full_like(v[...], value)) if is_temperature else v
  return jax.tree.map(set_value, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def count_params(state, variable_type=nnx.Param, exclude=Temperature) -> int:
  """Parameters of `variable_type` in a (possibly abstract) state, not counting `exclude`."""
  leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return sum(v.size for v in leaves if isinstance(v, variable_type) and not (exclude and isinstance(v, exclude)))


def flops_per_token(cfg) -> float:
  """Training FLOPs per token (forward + backward): 6 per weight plus attention's 12 L T D' (PaLM, appendix B)."""
  m = cfg.model
  D, F, V, L = m.embed_dim, m.mlp_dim, m.vocab_size, m.num_layers
  H, K, Dh, T = m.num_heads, m.num_kv_heads, config.head_dim(cfg), cfg.data.seq_len
  matmul_weights = L * (D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F) + D * V  # The embedding lookup is no matmul.
  # Causal attention does half the T^2 work, which the standard MFU formula does not subtract.
  return 6.0 * matmul_weights + 12.0 * L * H * Dh * T
