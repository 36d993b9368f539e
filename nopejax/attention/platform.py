"""The fused platform kernels and the platform they run on.

splash: the Pallas TPU splash attention kernel under shard_map over the mesh (interpreted on other
platforms, for tests). cudnn: cuDNN's fused attention on GPU (bfloat16, causal, no segment mask),
called from `core.attend` through jax.nn.dot_product_attention; here only the test of when it applies.
"""
import math

import jax
import jax.numpy as jnp

from nopejax import sharding


def current_platform() -> str:
  """The platform of the mesh being traced for (a TPU topology compiled from a CPU host counts as TPU)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def cudnn_unsupported(dtype, head_dim, has_segments) -> str:
  """Why cuDNN attention cannot run this shape, or '' if it can."""
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f'cuDNN attention needs bfloat16 inputs, not {jnp.dtype(dtype).name}'
  if head_dim % 8 or head_dim > 256:
    return f'cuDNN attention needs a head dimension that is a multiple of 8 up to 256, not {head_dim}'
  if has_segments:
    # jax 0.10.2's packed-segment path picked the wrong keys under GQA (jax 0.12.1 carries an upstream
    # fix, not yet checked on a GPU here), and a boolean mask becomes a dense [B, 1, T, T] bias with a
    # dense gradient: neither is what cudnn is for.
    return 'cuDNN attention here does not mask packed documents apart'
  return ''


def _splash_kernel(num_heads, seq_len, block, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len))] * num_heads)
  blocks = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                         block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT=None, block_size=512, rules=None):
  """The `splash` kernel, one sequence per call, under shard_map with rows and heads placed as `rules` say.

  Splash applies no 1/sqrt(d) and needs lengths in multiples of its 128-wide blocks: q is scaled
  here and the sequence padded (padded keys come after every real query, so the causal mask hides them).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, T, H, Dh = q_BxTxHxDh.shape
  lanes = 128
  block = min(block_size - block_size % lanes or lanes, -(-T // lanes) * lanes)
  P = -(-T // block) * block
  interpret = current_platform() != 'tpu'
  q = (q_BxTxHxDh.astype(jnp.float32) * (1.0 / math.sqrt(Dh))).astype(q_BxTxHxDh.dtype)

  def to_heads_first(x_BxTxNxD):
    return jnp.pad(x_BxTxNxD, ((0, 0), (0, P - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  q_BxHxPxD, k_BxKxPxD, v_BxKxPxD = map(to_heads_first, (q, k_BxTxKxDh, v_BxTxKxDh))
  seg_BxP = (jnp.zeros((B, P), jnp.int32) if segment_ids_BxT is None
             else jnp.pad(segment_ids_BxT, ((0, 0), (0, P - T))))

  def local(q_BxHxPxD, k_BxKxPxD, v_BxKxPxD, seg_BxP):
    kernel = _splash_kernel(q_BxHxPxD.shape[1], P, block, interpret)
    per_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))
    return jax.vmap(per_row)(q_BxHxPxD, k_BxKxPxD, v_BxKxPxD, seg_BxP)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and rules is not None:
    # Pallas kernels run per device: each sees its rows and heads (the sequence stays whole).
    q_spec = sharding.logical_spec(('batch', 'heads', None, None), rules)
    kv_spec = sharding.logical_spec(('batch', 'kv_heads', None, None), rules)
    local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, sharding.logical_spec(('batch', None), rules)),
                          out_specs=q_spec, check_vma=False)
  out_BxHxPxD = local(q_BxHxPxD, k_BxKxPxD, v_BxKxPxD, seg_BxP)
  return out_BxHxPxD.transpose(0, 2, 1, 3)[:, :T]
