"""The decoder: Llama-style blocks (RMSNorm, grouped-query attention, SwiGLU); no position encoding
by default, or RoPE (and its scalings) or ALiBi (`model.position`, positions.py): rotations and
multipliers act on q and k before the attention kernel, a bias on the logits inside it. With
`model.rope_layers` the position is per layer (a RoPE/NoPE hybrid): each layer holds its flag, and
the scan over layers carries the flags as data.

Every parameter names its logical axes (`axes=`) so sharding.py can place it on any mesh.
Each attention layer owns a float32 `Temperature` of shape [num_heads], the multiplier c_h on q
(with `model.temperature_schedule`, a function of the query's position too: attention.query_temperatures).
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nopejax import attention, config, positions, sharding


class Temperature(nnx.Param):
  """Per-head multiplier on q. Its own variable type so the optimizer can train it alone or not at all."""


class TemperatureSlope(Temperature):
  """The log schedule's a_h: trains with the temperatures, but a uniform c (set_temperatures) leaves it."""


def project(x_Nx___xD, w_Dx___):
  """x @ w over x's last axis and w's first, as one 2-D matmul [N, D] @ [D, F]: leading axes merged.

  Why 2-D: XLA:CPU forms a 2-D matmul's weight gradient straight from the row-major activations,
  while a 3-D einsum's gradient first copies them transposed (a single-threaded copy per matmul,
  a third of the MLP's backward time at width 256). Merging leading axes is free on every backend.
  """
  lead, D = x_Nx___xD.shape[:-1], x_Nx___xD.shape[-1]
  out = x_Nx___xD.reshape(-1, D) @ w_Dx___.reshape(D, -1)
  return out.reshape(*lead, *w_Dx___.shape[1:])


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

  def __init__(self, cfg, rngs, uses_rope=None):
    m = cfg.model
    D, H, K, Dh = m.embed_dim, m.num_heads, m.num_kv_heads, config.head_dim(cfg)
    self.q_DxHxDh = _normal(rngs, (D, H, Dh), ('embed', 'heads', 'head_dim'), m.init_std)
    self.k_DxKxDh = _normal(rngs, (D, K, Dh), ('embed', 'kv_heads', 'head_dim'), m.init_std)
    self.v_DxKxDh = _normal(rngs, (D, K, Dh), ('embed', 'kv_heads', 'head_dim'), m.init_std)
    self.o_HxDhxD = _normal(rngs, (H, Dh, D), ('heads', 'head_dim', 'embed'), m.init_std)
    # The schedule's parameters (attention.query_temperatures): c_h, with a_h for 'log'; s_h for 'ssmax',
    # starting where s_h ln(L) = model.temperature.
    self.schedule, self.schedule_length = m.temperature_schedule, config.temperature_length(cfg)
    self.octave_shape = m.temperature_octave_shape
    start = m.temperature / math.log(self.schedule_length) if self.schedule == 'ssmax' else m.temperature
    self.temperature = Temperature(jnp.full((H,), start, jnp.float32), axes=('temperature',))
    if self.schedule == 'log':  # [H], or [K, H] for K octaves (model.temperature_octaves).
      K = m.temperature_octaves
      self.temperature_slope = TemperatureSlope(jnp.zeros((H,) if K == 1 else (K, H), jnp.float32),
                                                axes=('temperature',) if K == 1 else (None, 'temperature'))
    self.dtype = jnp.dtype(m.dtype)
    self.rules = cfg.mesh.rules
    self.implementation = m.attention_impl
    self.block_size = m.attention_block
    self.chunked_from = m.attention_chunked_from
    self.encoding = positions.from_config(cfg)
    self.uses_rope = uses_rope  # This layer's flag (positions.layer_flags); None: as model.position.
    self.num_heads = H
    if m.position == 'kerple':  # KERPLE-log's learned (r1, r2) per head, before their softplus.
      self.kerple_r1_H, self.kerple_r2_H = (nnx.Param(jnp.full((H,), positions.KERPLE_INIT, jnp.float32),
                                                      axes=('heads',)) for _ in range(2))

  def qkv(self, x_BxTxD, positions_BxT, length=None, uses_rope=None):
    """Projections, with the position encoding applied to q and k and the temperature to q.

    length: the context length that dynamic scalings read (default T; the cache length when decoding).
    uses_rope: a traced per-layer flag in place of the layer's own (scanned layers share one module).
    """
    dt = self.dtype
    q_BxTxHxDh = project(x_BxTxD, self.q_DxHxDh[...].astype(dt))
    k_BxTxKxDh = project(x_BxTxD, self.k_DxKxDh[...].astype(dt))
    v_BxTxKxDh = project(x_BxTxD, self.v_DxKxDh[...].astype(dt))
    q_BxTxHxDh, k_BxTxKxDh = positions.apply(self.encoding, q_BxTxHxDh, k_BxTxKxDh, positions_BxT,
                                             length or x_BxTxD.shape[1],
                                             self.uses_rope if uses_rope is None else uses_rope)
    slope_H = self.temperature_slope[...] if self.schedule == 'log' else None
    temperature_BxTxH = attention.query_temperatures(self.schedule, positions_BxT, self.schedule_length,
                                                     self.temperature[...], slope_H, self.octave_shape)
    q_BxTxHxDh = attention.scale_queries(q_BxTxHxDh, temperature_BxTxH)
    # Named so that model.remat='save_qkv_proj' keeps them for the backward pass.
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = (checkpoint_name(a, 'qkv_proj') for a in (q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh))
    q_BxTxHxDh = sharding.constrain(q_BxTxHxDh, ('batch', 'seq', 'heads', 'head_dim'), self.rules)
    return q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh

  def out(self, y_BxTxHxDh):
    B, T, H, Dh = y_BxTxHxDh.shape
    return project(y_BxTxHxDh.reshape(B, T, H * Dh), self.o_HxDhxD[...].reshape(H * Dh, -1).astype(self.dtype))

  def bias(self):
    """The logits' bias hook (ALiBi, KERPLE) or None; see attention.attend."""
    learned = (self.kerple_r1_H[...], self.kerple_r2_H[...]) if self.encoding.position == 'kerple' else None
    return positions.bias(self.encoding, self.num_heads, learned)

  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, uses_rope=None):
    q, k, v = self.qkv(x_BxTxD, positions_BxT, uses_rope=uses_rope)
    return self.out(attention.attend(q, k, v, segment_ids_BxT, self.implementation, self.block_size,
                                     self.chunked_from, self.rules, positions_BxT, self.bias()))

  def forward_chunked(self, x_BxTxD, query_chunk, with_entropy=False, length=None):
    """One sequence per row (no segments), `query_chunk` queries at a time: memory linear in T.

    Returns (out_BxTxD, entropy_BxHxT or None, k_BxTxKxDh, v_BxTxKxDh). The keys are unscaled (the
    temperature multiplies q only), so they can fill a KV cache that any temperature can read;
    with RoPE they are rotated by their positions 0 .. T-1, as the cache needs them (for the cache's
    `length`, which dynamic scalings read).
    """
    positions_BxT = jnp.broadcast_to(jnp.arange(x_BxTxD.shape[1]), x_BxTxD.shape[:2])
    q, k, v = self.qkv(x_BxTxD, positions_BxT, length)
    y_BxTxHxDh, entropy_BxHxT = attention.attend_chunked(q, k, v, query_chunk, with_entropy, self.bias())
    return self.out(y_BxTxHxDh), entropy_BxHxT, k, v

  def decode(self, x_Bx1xD, cache, index_B):
    """One new token per row at position index_B: its k, v go into the cache, then it attends.

    cache = {'k': k_BxSxKxDh, 'v': v_BxSxKxDh}; entries past a row's index are ignored.
    Returns (out_Bx1xD, updated cache).
    """
    q_Bx1xHxDh, k_Bx1xKxDh, v_Bx1xKxDh = self.qkv(x_Bx1xD, index_B[:, None], cache['k'].shape[1])
    cache = {'k': attention.write_cache(cache['k'], k_Bx1xKxDh[:, 0], index_B),
             'v': attention.write_cache(cache['v'], v_Bx1xKxDh[:, 0], index_B)}
    y_Bx1xHxDh, _ = attention.attend_rows(q_Bx1xHxDh, cache['k'], cache['v'], index_B[:, None], with_entropy=False,
                                          bias=self.bias())
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
    gate_BxTxF = jax.nn.silu(project(x_BxTxD, self.gate_DxF[...].astype(dt)))
    return project(gate_BxTxF * project(x_BxTxD, self.up_DxF[...].astype(dt)), self.down_FxD[...].astype(dt))


class Block(nnx.Module):

  def __init__(self, cfg, rngs, uses_rope=None):
    self.attention_norm = RMSNorm(cfg.model.embed_dim, cfg.model.norm_eps)
    self.attention = Attention(cfg, rngs, uses_rope)
    self.mlp_norm = RMSNorm(cfg.model.embed_dim, cfg.model.norm_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, uses_rope=None):
    x_BxTxD = x_BxTxD + self.attention(self.attention_norm(x_BxTxD), segment_ids_BxT, positions_BxT, uses_rope)
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))

  def forward_chunked(self, x_BxTxD, query_chunk, with_entropy=False, length=None):
    """The block on the long-context path: (x_BxTxD, entropy_BxHxT or None, k, v); see Attention."""
    y_BxTxD, entropy_BxHxT, k, v = self.attention.forward_chunked(
        self.attention_norm(x_BxTxD), query_chunk, with_entropy, length)
    x_BxTxD = x_BxTxD + y_BxTxD
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), entropy_BxHxT, k, v

  def decode(self, x_Bx1xD, cache, index_B):
    """The block for one cached decoding step: (x_Bx1xD, updated cache)."""
    y_Bx1xD, cache = self.attention.decode(self.attention_norm(x_Bx1xD), cache, index_B)
    x_Bx1xD = x_Bx1xD + y_Bx1xD
    return x_Bx1xD + self.mlp(self.mlp_norm(x_Bx1xD)), cache


# model.remat (config.REMAT) -> what jax.checkpoint keeps of a block for the backward pass (None: nothing).
REMAT_POLICIES = {
    'full': None,  # Everything is recomputed: least memory.
    'save_dots': jax.checkpoint_policies.dots_saveable,  # Every matmul output, attention logits included.
    'save_dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # Projections and MLP, not attention.
    'save_qkv_proj': jax.checkpoint_policies.save_only_these_names('qkv_proj'),  # q, k, v only.
    # As 'full', with each layer's input (all the backward pass keeps) in the host's memory: the
    # [L, B, T, D] stack leaves HBM, copied out in the forward pass and back, a layer ahead, in the
    # backward pass (TPU and GPU; on the CPU host and device memory are one).
    'offload': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=['layer_input'],
        offload_src='device', offload_dst='pinned_host'),
}


def _block_fn(graphdef, remat, prevent_cse=True):
  """pure(block_state, x_BxTxD, segment_ids_BxT, positions_BxT, uses_rope=None) -> x_BxTxD, under `remat`
  (a config.REMAT name); uses_rope: a scanned hybrid's traced per-layer flag.

  Plain jax.checkpoint over the block's split state, because nnx.remat writes variables back
  afterwards, which fails when the model was merged inside an outer jax.grad.
  """
  def pure_block(block_state, x_BxTxD, segment_ids_BxT, positions_BxT, uses_rope=None):
    x_BxTxD = checkpoint_name(x_BxTxD, 'layer_input')  # What model.remat='offload' moves to the host.
    return nnx.merge(graphdef, block_state)(x_BxTxD, segment_ids_BxT, positions_BxT, uses_rope)

  if remat == 'none':
    return pure_block
  return jax.checkpoint(pure_block, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


def _stack_blocks(blocks, rules):
  """The blocks' states stacked along a leading `layers` axis (each weight [L, ...]), for the scan."""
  states = [nnx.state(block) for block in blocks]

  def stack(*variables):
    stacked = jnp.stack([v[...] for v in variables])
    axes = variables[0].get_metadata().get('axes')
    if axes is not None:
      stacked = sharding.constrain(stacked, ('layers',) + tuple(axes), rules)
    return variables[0].replace(stacked)

  return jax.tree.map(stack, *states, is_leaf=lambda v: isinstance(v, nnx.Variable))


class Transformer(nnx.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32."""

  def __init__(self, cfg, rngs):
    m = cfg.model
    self.embed_VxD = _normal(rngs, (m.vocab_size, m.embed_dim), ('vocab', 'embed'), m.init_std)
    # Per-layer position (model.rope_layers): None, or one bool per layer, True where RoPE applies.
    self.rope_layers = positions.layer_flags(m.rope_layers, m.num_layers)
    self.blocks = nnx.List([Block(cfg, rngs, None if self.rope_layers is None else self.rope_layers[i])
                            for i in range(m.num_layers)])
    self.final_norm = RMSNorm(m.embed_dim, m.norm_eps)
    if not m.tie_embeddings:  # Tied: the output projection is the embedding, transposed.
      self.head_DxV = _normal(rngs, (m.embed_dim, m.vocab_size), ('embed', 'vocab'), m.init_std)
    self.tie_embeddings = m.tie_embeddings
    self.dtype = jnp.dtype(m.dtype)
    self.rules = cfg.mesh.rules
    # Recomputing each block in the backward pass trades compute for activation memory.
    self.remat = config.remat_name(m.remat)
    # One scanned block instead of L unrolled ones: the step compiles in time independent of L.
    self.scan_layers = m.scan_layers

  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
    """Packed documents: segment ids keep them apart, positions (default 0 .. T-1) place their tokens."""
    return self.head(self.hidden(tokens_BxT, segment_ids_BxT, positions_BxT))

  def hidden(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
    """The last block's output x_BxTxD (logits = head(x)), as __call__ computes it."""
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(self.dtype)
    graphdef = nnx.graphdef(self.blocks[0])
    if self.scan_layers:
      # The weights stay one variable per layer (checkpoints, evaluation and the search read them
      # so); the step stacks them into [L, ...] arrays and scans one block over them. Only the
      # carry leaves the scan body, never the weights.
      block = _block_fn(graphdef, self.remat, prevent_cse=False)

      def scan_body(x_BxTxD, layer):
        block_state, uses_rope = layer
        x_BxTxD = sharding.constrain(x_BxTxD, ('batch', 'seq', 'act_embed'), self.rules)
        return block(block_state, x_BxTxD, segment_ids_BxT, positions_BxT, uses_rope), None

      # A hybrid's flags travel with the layers' weights: one body serves RoPE and NoPE layers.
      flags_L = None if self.rope_layers is None else jnp.asarray(self.rope_layers)
      x_BxTxD, _ = jax.lax.scan(scan_body, x_BxTxD, (_stack_blocks(self.blocks, self.rules), flags_L))
      return x_BxTxD
    for layer in self.blocks:
      x_BxTxD = sharding.constrain(x_BxTxD, ('batch', 'seq', 'act_embed'), self.rules)
      if self.remat == 'none':
        x_BxTxD = layer(x_BxTxD, segment_ids_BxT, positions_BxT)
      else:  # Each layer's own graphdef: a hybrid's layers differ in their flag.
        x_BxTxD = _block_fn(nnx.graphdef(layer), self.remat)(nnx.state(layer), x_BxTxD, segment_ids_BxT, positions_BxT)
    return x_BxTxD

  # ------------------------------------------------------------------------------------------
  # Evaluation and decoding: one document per row, attention a query chunk at a time.

  def head(self, x_BxTxD):
    """Final norm and output projection of hidden states: logits_BxTxV, float32."""
    x_BxTxD = self.final_norm(x_BxTxD)
    head_DxV = self.embed_VxD[...].T if self.tie_embeddings else self.head_DxV[...]
    return project(x_BxTxD, head_DxV.astype(self.dtype)).astype(jnp.float32)

  def _forward_chunked(self, tokens_BxT, query_chunk, with_entropy, length=None):
    x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(self.dtype)
    entropies, caches = [], []
    for block in self.blocks:
      x_BxTxD, entropy_BxHxT, k_BxTxKxDh, v_BxTxKxDh = block.forward_chunked(x_BxTxD, query_chunk, with_entropy, length)
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
    x_BxTxD, _, caches = self._forward_chunked(tokens_BxT, query_chunk, with_entropy=False, length=cache_len)
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


def set_temperatures(state, value, cfg=None):
  """`state` with a uniform c on every head (same shapes, dtypes and shardings).

  With `cfg` (the model's config) and the ssmax schedule, c is the multiplier at i = L as model
  init reads model.temperature: s_h = c / ln L. Without it, every temperature is set to `value` as is.
  The log schedule's slopes a_h stay as they are (0 unless trained)."""
  if cfg is not None and cfg.model.temperature_schedule == 'ssmax':
    value = value / math.log(config.temperature_length(cfg))

  def set_value(v):
    is_temperature = isinstance(v, Temperature) and not isinstance(v, TemperatureSlope)
    return v.replace(jnp.full_like(v[...], value)) if is_temperature else v
  return jax.tree.map(set_value, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def count_params(state, variable_type=nnx.Param, exclude=Temperature) -> int:
  """Parameters of `variable_type` in a (possibly abstract) state, not counting `exclude`."""
  leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return sum(v.size for v in leaves if isinstance(v, variable_type) and not (exclude and isinstance(v, exclude)))


def flops_per_token(cfg) -> float:
  """Training FLOPs per token (forward + backward): 6 per weight plus attention's 12 L T D' (PaLM, appendix B).

  The temperature search forms no weight gradient (its gradient runs over the temperatures only),
  so a weight costs 4 there: forward, and the backward pass to the activations. Rematerialized
  forward passes are not counted (model FLOPs, as MFU is defined).
  """
  m = cfg.model
  D, F, V, L = m.embed_dim, m.mlp_dim, m.vocab_size, m.num_layers
  H, K, Dh, T = m.num_heads, m.num_kv_heads, config.head_dim(cfg), cfg.data.seq_len
  matmul_weights = L * (D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F) + D * V  # The embedding lookup is no matmul.
  # Causal attention does half the T^2 work, which the standard MFU formula does not subtract.
  per_weight = 4.0 if cfg.train.trainable == 'temperature' else 6.0
  return per_weight * matmul_weights + 12.0 * L * H * Dh * T
