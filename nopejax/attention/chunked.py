"""The `chunked` attention kernel: flash attention in plain JAX (FlashAttention-2's schedule, forward and backward).

Blocks of queries meet blocks of keys with an online softmax; a custom VJP saves only the output and
the log-sum-exp per query, so memory grows linearly with T forward and backward. Runs on every backend.
Query block i sees key blocks 0..i only (equal block sizes, causal), so the loops skip the masked
upper triangle. Padding to a multiple of the block adds keys after every real query (the causal mask
hides them) and queries whose rows are dropped.
"""
import functools
import math

import jax
import jax.numpy as jnp


def _to_blocks(x_BxTx___, num_blocks):
  """[B, T, ...] -> [N, B, C, ...] with T = N * C."""
  B, T = x_BxTx___.shape[:2]
  return x_BxTx___.reshape(B, num_blocks, T // num_blocks, *x_BxTx___.shape[2:]).swapaxes(0, 1)


def _from_blocks(x_NxBxCx___):
  N, B, C = x_NxBxCx___.shape[:3]
  return x_NxBxCx___.swapaxes(0, 1).reshape(B, N * C, *x_NxBxCx___.shape[3:])


def _block_bias(bias, q_positions_BxC, k_positions_BxC, K, G):
  """The bias hook for one block pair, shaped as the logits: bias_BxKxGxCqxCk float32."""
  fn, params = bias
  bias_BxHxCxC = fn(params, q_positions_BxC, k_positions_BxC)
  B, _, Cq, Ck = bias_BxHxCxC.shape
  return bias_BxHxCxC.reshape(B, K, G, Cq, Ck)


def _block_logits(q_BxKxGxCxD, k_BxKxCxD, i, j, segq_BxC, segk_BxC, bias_BxKxGxCxC=None):
  """Scaled (and biased) logits of query block i against key block j, -inf where masked: s_BxKxGxCqxCk (float32)."""
  C, D = q_BxKxGxCxD.shape[3], q_BxKxGxCxD.shape[-1]
  s = jnp.einsum('bkgqd,bksd->bkgqs', q_BxKxGxCxD, k_BxKxCxD, preferred_element_type=jnp.float32)
  s = s * (1.0 / math.sqrt(D))
  if bias_BxKxGxCxC is not None:
    s = s + bias_BxKxGxCxC
  visible_CxC = (i * C + jnp.arange(C))[:, None] >= (j * C + jnp.arange(C))[None, :]
  visible = visible_CxC[None, None, None]
  if segq_BxC is not None:
    visible = visible & (segq_BxC[:, :, None] == segk_BxC[:, None, :])[:, None, None]
  return jnp.where(visible, s, -jnp.inf)


def _flash_forward(q_NxBxKxGxCxD, k_NxBxKxCxD, v_NxBxKxCxD, seg_NxBxC, pos_NxBxC, bias_fn, bias_params):
  """(out_NxBxKxGxCxD in v's dtype, lse_NxBxKxGxC float32)."""
  N, B, K, G, C, D = q_NxBxKxGxCxD.shape

  def query_block(args):
    i, q_BxKxGxCxD, segq_BxC = args

    def key_block(j, carry):
      max_BxKxGxC, total_BxKxGxC, acc_BxKxGxCxD = carry
      segk = None if seg_NxBxC is None else seg_NxBxC[j]
      bias_block = None if bias_fn is None else _block_bias((bias_fn, bias_params), pos_NxBxC[i], pos_NxBxC[j], K, G)
      s = _block_logits(q_BxKxGxCxD, k_NxBxKxCxD[j], i, j, segq_BxC, segk, bias_block)
      new_max = jnp.maximum(max_BxKxGxC, jnp.max(s, axis=-1))
      # A row with no visible key yet keeps max -inf; shift it by 0 so exp gives 0, not NaN.
      shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      p = jnp.exp(s - shift[..., None])
      rescale = jnp.exp(max_BxKxGxC - shift)
      total = rescale * total_BxKxGxC + jnp.sum(p, axis=-1)
      pv = jnp.einsum('bkgqs,bksd->bkgqd', p.astype(v_NxBxKxCxD.dtype), v_NxBxKxCxD[j],
                      preferred_element_type=jnp.float32)
      return new_max, total, rescale[..., None] * acc_BxKxGxCxD + pv

    init = (jnp.full((B, K, G, C), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, C), jnp.float32),
            jnp.zeros((B, K, G, C, D), jnp.float32))
    row_max, total, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    out_BxKxGxCxD = (acc / total[..., None]).astype(v_NxBxKxCxD.dtype)
    return out_BxKxGxCxD, row_max + jnp.log(total)

  seg = None if seg_NxBxC is None else seg_NxBxC
  return jax.lax.map(query_block, (jnp.arange(N), q_NxBxKxGxCxD, seg))


def _flash_backward(q_NxBxKxGxCxD, k_NxBxKxCxD, v_NxBxKxCxD, seg_NxBxC, pos_NxBxC, bias_fn, bias_params,
                    out_NxBxKxGxCxD, lse_NxBxKxGxC, dout, with_kv=True):
  """Gradients for q, k, v and the bias params: key blocks outside, the query blocks that see each key block inside.

  with_kv=False leaves out dk and dv (returned as None) and the block products that make them.
  """
  N, B, K, G, C, D = q_NxBxKxGxCxD.shape
  scale = 1.0 / math.sqrt(D)
  # delta_i = sum_d dout * out = sum_j p_ij dp_ij, the softmax's correction term.
  delta_NxBxKxGxC = jnp.einsum('nbkgqd,nbkgqd->nbkgq', dout.astype(jnp.float32), out_NxBxKxGxCxD.astype(jnp.float32))

  def key_block(carry, args):
    dq_NxBxKxGxCxD, dparams = carry
    j, k_BxKxCxD, v_BxKxCxD = args
    segk = None if seg_NxBxC is None else seg_NxBxC[j]

    def query_block(i, carry):
      dq, dparams, dk_BxKxCxD, dv_BxKxCxD = carry
      q_i, dout_i = q_NxBxKxGxCxD[i], dout[i]
      segq = None if seg_NxBxC is None else seg_NxBxC[i]
      bias_block, bias_vjp = None, None
      if bias_fn is not None:
        bias_block, bias_vjp = jax.vjp(lambda params: _block_bias((bias_fn, params), pos_NxBxC[i], pos_NxBxC[j], K, G),
                                       bias_params)
      s = _block_logits(q_i, k_BxKxCxD, i, j, segq, segk, bias_block)
      p = jnp.exp(s - lse_NxBxKxGxC[i][..., None])  # Masked logits are -inf: p = 0 there.
      if with_kv:
        dv_BxKxCxD = dv_BxKxCxD + jnp.einsum('bkgqs,bkgqd->bksd', p.astype(dout.dtype), dout_i,
                                             preferred_element_type=jnp.float32)
      dp = jnp.einsum('bkgqd,bksd->bkgqs', dout_i, v_BxKxCxD, preferred_element_type=jnp.float32)
      dlogits = p * (dp - delta_NxBxKxGxC[i][..., None])  # The gradient of the biased logits.
      if bias_vjp is not None:
        dparams = jax.tree.map(jnp.add, dparams, bias_vjp(dlogits)[0])
      ds = dlogits * scale
      dq_i = jnp.einsum('bkgqs,bksd->bkgqd', ds.astype(k_BxKxCxD.dtype), k_BxKxCxD, preferred_element_type=jnp.float32)
      if with_kv:
        dk_BxKxCxD = dk_BxKxCxD + jnp.einsum('bkgqs,bkgqd->bksd', ds.astype(q_i.dtype), q_i,
                                             preferred_element_type=jnp.float32)
      return dq.at[i].add(dq_i), dparams, dk_BxKxCxD, dv_BxKxCxD

    zeros = jnp.zeros((B, K, C, D), jnp.float32) if with_kv else None
    dq_NxBxKxGxCxD, dparams, dk, dv = jax.lax.fori_loop(j, N, query_block, (dq_NxBxKxGxCxD, dparams, zeros, zeros))
    return (dq_NxBxKxGxCxD, dparams), (dk, dv)

  dq0 = jnp.zeros(q_NxBxKxGxCxD.shape, jnp.float32)
  dparams0 = jax.tree.map(jnp.zeros_like, bias_params)
  (dq, dparams), (dk_NxBxKxCxD, dv_NxBxKxCxD) = jax.lax.scan(
      key_block, (dq0, dparams0), (jnp.arange(N), k_NxBxKxCxD, v_NxBxKxCxD))
  return dq, dk_NxBxKxCxD, dv_NxBxKxCxD, dparams


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_blocks(q, k, v, seg, pos, bias_fn, bias_params):
  return _flash_forward(q, k, v, seg, pos, bias_fn, bias_params)[0]


def _flash_blocks_fwd(q, k, v, seg, pos, bias_fn, bias_params):
  # symbolic_zeros: every argument leaf comes as (value, perturbed). Where neither k nor v is
  # perturbed (the first layer in the temperature search: its keys and values come from frozen
  # weights and the embedding), the backward pass leaves their gradients out.
  with_kv = k.perturbed or v.perturbed
  q, k, v, seg, pos, bias_params = jax.tree.map(lambda a: a.value, (q, k, v, seg, pos, bias_params))
  out, lse = _flash_forward(q, k, v, seg, pos, bias_fn, bias_params)
  # with_kv rides in the residuals' structure ((), or None), since residual leaves must be arrays.
  return out, (q, k, v, seg, pos, bias_params, out, lse, () if with_kv else None)


def _flash_blocks_bwd(bias_fn, residuals, dout):
  q, k, v, seg, pos, bias_params, out, lse, with_kv = residuals
  if isinstance(dout, jax.custom_derivatives.SymbolicZero):  # The output is not differentiated.
    return None, None, None, None, None, None
  dq, dk, dv, dparams = _flash_backward(q, k, v, seg, pos, bias_fn, bias_params, out, lse, dout, with_kv is not None)
  if with_kv is None:
    return dq.astype(q.dtype), None, None, None, None, dparams
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, dparams


_flash_blocks.defvjp(_flash_blocks_fwd, _flash_blocks_bwd, symbolic_zeros=True)


def flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT=None, block_size=512,
                    positions_BxT=None, bias=None):
  """The `chunked` kernel: same result as `attend(..., implementation='xla')`, memory linear in T.

  A bias (see `attend`) is evaluated per block pair from the positions, never as a [T, T] tensor.
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxTxKxDh.shape[2]
  C = min(block_size, T)
  N = -(-T // C)
  pad = ((0, 0), (0, N * C - T), (0, 0), (0, 0))
  # Heads before positions inside the blocks, once here: every block product in the loops is then a
  # plain batched matmul over (row, head), with no transpose per block pair.
  q_NxBxKxGxCxD = _to_blocks(jnp.pad(q_BxTxHxDh, pad).reshape(B, N * C, K, H // K, Dh), N).transpose(0, 1, 3, 4, 2, 5)
  k_NxBxKxCxD = _to_blocks(jnp.pad(k_BxTxKxDh, pad), N).transpose(0, 1, 3, 2, 4)
  v_NxBxKxCxD = _to_blocks(jnp.pad(v_BxTxKxDh, pad), N).transpose(0, 1, 3, 2, 4)
  seg_NxBxC = None
  if segment_ids_BxT is not None:
    seg_NxBxC = _to_blocks(jnp.pad(segment_ids_BxT, ((0, 0), (0, N * C - T))), N)
  bias_fn, bias_params, pos_NxBxC = None, None, None
  if bias is not None:
    bias_fn, bias_params = bias
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    pos_NxBxC = _to_blocks(jnp.pad(positions_BxT, ((0, 0), (0, N * C - T))), N)
  out_NxBxKxGxCxD = _flash_blocks(q_NxBxKxGxCxD, k_NxBxKxCxD, v_NxBxKxCxD, seg_NxBxC, pos_NxBxC, bias_fn, bias_params)
  return _from_blocks(out_NxBxKxGxCxD.transpose(0, 1, 4, 2, 3, 5)).reshape(B, N * C, H, Dh)[:, :T]
