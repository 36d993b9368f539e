"""The decoder: Llama-style blocks (RMSNorm, grouped-query attention, SwiGLU) with no position encoding.

Every parameter names its logical axes (`axes=`) so sharding.py can place it on any mesh.
Each attention layer owns a float32 `Temperature` of shape [num_heads], the multiplier c_h on q.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from nopejax import attention, config, sharding


class Temperature(nnx.Param):
  """Per-head multiplier on q. Its own variable type so the optimizer can train it alone or not at all."""


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
    self.temperature = Temperature(jnp.full((H,), m.temperature, jnp.float32), axes=('temperature',))
    self.dtype = jnp.dtype(m.dtype)
    self.rules = cfg.mesh.rules
    self.implementation = m.attention_impl

  def qkv(self, x_BxTxD):
    """Projections, with the temperature already applied to q."""
    dt = self.dtype
    q_BxTxHxDh = jnp.einsum('btd,dhk->bthk', x_BxTxD, self.q_DxHxDh[...].astype(dt))
    k_BxTxKxDh = jnp.einsum('btd,dhk->bthk', x_BxTxD, self.k_DxKxDh[...].astype(dt))
    v_BxTxKxDh = jnp.einsum('btd,dhk->bthk', x_BxTxD, self.v_DxKxDh[...].astype(dt))
    q_BxTxHxDh = attention.scale_queries(q_BxTxHxDh, self.temperature[...])
    q_BxTxHxDh = sharding.constrain(q_BxTxHxDh, ('batch', 'seq', 'heads', 'head_dim'), self.rules)
    return q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh

  def out(self, y_BxTxHxDh):
    return jnp.einsum('bthk,hkd->btd', y_BxTxHxDh, self.o_HxDhxD[...].astype(self.dtype))

  def __call__(self, x_BxTxD, segment_ids_BxT):
    q, k, v = self.qkv(x_BxTxD)
    return self.out(attention.attend(q, k, v, segment_ids_BxT, self.implementation))


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

  def __call__(self, x_BxTxD, segment_ids_BxT):
    x_BxTxD = x_BxTxD + self.attention(self.attention_norm(x_BxTxD), segment_ids_BxT)
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))


def _run_block(block, x_BxTxD, segment_ids_BxT):
  return block(x_BxTxD, segment_ids_BxT)


def _run_block_rematerialized(block, x_BxTxD, segment_ids_BxT):
  """Runs a block under jax.checkpoint: its activations are recomputed in the backward pass.

  Plain jax.checkpoint over the block's split state, because nnx.remat writes variables back
  afterwards, which fails when the model was merged inside an outer jax.grad.
  """
  graphdef, block_state = nnx.split(block)

  def pure_block(block_state, x_BxTxD, segment_ids_BxT):
    return nnx.merge(graphdef, block_state)(x_BxTxD, segment_ids_BxT)

  return jax.checkpoint(pure_block)(block_state, x_BxTxD, segment_ids_BxT)


class Transformer(nnx.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32."""

  def __init__(self, cfg, rngs):
    m = cfg.model
    self.embed_VxD = _normal(rngs, (m.vocab_size, m.embed_dim), ('vocab', 'embed'), m.init_std)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(m.num_layers)])
    self.final_norm = RMSNorm(m.embed_dim, m.norm_eps)
    self.head_DxV = _normal(rngs, (m.embed_dim, m.vocab_size), ('embed', 'vocab'), m.init_std)
    self.dtype = jnp.dtype(m.dtype)
    self.rules = cfg.mesh.rules
    # Recomputing each block in the backward pass trades compute for activation memory.
    self.run_block = _run_block_rematerialized if m.remat else _run_block

  def __call__(self, tokens_BxT, segment_ids_BxT=None):
    x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(self.dtype)
    for block in self.blocks:
      x_BxTxD = sharding.constrain(x_BxTxD, ('batch', 'seq', 'act_embed'), self.rules)
      x_BxTxD = self.run_block(block, x_BxTxD, segment_ids_BxT)
    x_BxTxD = self.final_norm(x_BxTxD)
    return jnp.einsum('btd,dv->btv', x_BxTxD, self.head_DxV[...].astype(self.dtype)).astype(jnp.float32)


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
