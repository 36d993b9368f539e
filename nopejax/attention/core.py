"""One attention core: the per-head temperature scales q, then one of several causal attention kernels runs.

Scaling q (not the logits, not k) keeps any fused attention kernel usable unchanged and leaves
cached keys unscaled; q * c_h then the usual 1/sqrt(d) gives logits * c_h / sqrt(d).

Kernels (`model.attention_impl`), all causal with packed documents masked apart by segment ids and
grouped-query heads (head h reads kv head h // (H/K)); all but splash and cudnn also add a bias on
the logits (ALiBi, positions.bias), evaluated from positions block by block:
  xla      jax.nn.dot_product_attention: forms the [B, H, T, T] logits; the reference.
  chunked  plain JAX flash attention: blocks of queries against blocks of keys with an online
           softmax and a custom VJP that saves only the output and the log-sum-exp per query, so
           memory grows linearly with T forward and backward. Runs on every backend.
  splash   the Pallas TPU splash attention kernel, under shard_map over the mesh.
  cudnn    cuDNN's fused attention on GPU (bfloat16, causal, no segment mask).
  auto     splash on TPU, cudnn on GPU where it applies, else chunked from a length threshold, xla below;
           with a bias, chunked in place of splash and cudnn (they take no bias here).
"""
import functools
import math

import jax
import jax.numpy as jnp

from nopejax import config, sharding


def query_temperatures(schedule, positions_BxT, length, temperature_H, slope_H=None, octave_shape='ramp'):
  """tau_BxTxH, the multiplier on each query by its head and its position (0-based within its document).

  With i = position + 1 (1-based, so ln(1) = 0 falls on the first token, which sees one key and
  attends to it whatever the scale):
    constant  tau = c_h (returned as 1x1xH)
    log       tau = 1 for i <= length, c_h + a_h ln(i / length) beyond: the base model within length
              (slope_H [K, H] instead: one slope per octave, c_h + sum_k a_h,k r_k with r_k = ln(i / length)
              - k ln 2 clipped to [0, ln 2], the last not clipped above: a ramp linear in ln i per octave;
              octave_shape='step': c_h + a_h,k for L 2^k < i <= L 2^(k+1), the last octave to any length)
    ssmax     tau = s_h ln(i) (Scalable-Softmax, Nakanishi 2025), temperature_H holding s_h
  """
  c_1x1xH = temperature_H.astype(jnp.float32)[None, None, :]
  if schedule == 'constant':
    return c_1x1xH
  i_BxTx1 = positions_BxT.astype(jnp.float32)[:, :, None] + 1.0
  if schedule == 'log':
    slope_KxH = slope_H.astype(jnp.float32).reshape(-1, c_1x1xH.shape[-1])
    K = slope_KxH.shape[0]
    octave_K = jnp.arange(K, dtype=jnp.float32) * math.log(2.0)
    width_K = jnp.where(jnp.arange(K) < K - 1, math.log(2.0), jnp.inf)
    ramp_BxTxK = jnp.clip(jnp.log(i_BxTx1 / length) - octave_K, 0.0, width_K)
    if octave_shape == 'step':  # 1 in the query's own octave (compared as numbers, exact at i = L 2^k).
      octave_BxT = jnp.sum(i_BxTx1 > length * 2.0 ** jnp.arange(1, K, dtype=jnp.float32), axis=-1)
      ramp_BxTxK = jax.nn.one_hot(octave_BxT, K, dtype=jnp.float32)
    beyond_BxTxH = c_1x1xH + jnp.einsum('btk,kh->bth', ramp_BxTxK, slope_KxH)
    return jnp.where(i_BxTx1 > length, beyond_BxTxH, 1.0)
  if schedule == 'ssmax':
    return c_1x1xH * jnp.log(i_BxTx1)
  raise ValueError(f'unknown temperature schedule {schedule!r}')


def scale_queries(q_BxTxHxDh, temperature):
  """q * tau per head (temperature [H]) or per position and head ([B, T, H], query_temperatures),
  multiplied in float32 so a bf16 model still trains float32 temperatures."""
  tau = temperature[None, None, :] if temperature.ndim == 1 else temperature
  return (q_BxTxHxDh.astype(jnp.float32) * tau[..., None]).astype(q_BxTxHxDh.dtype)


def segment_mask(segment_ids_BxT):
  """[B, 1, T, T] True where query and key are in the same packed document."""
  return segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# Which kernel runs.


def cudnn_unsupported(dtype, head_dim, has_segments) -> str:
  """Why cuDNN attention cannot run this shape in jax 0.10.2, or '' if it can."""
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f'cuDNN attention needs bfloat16 inputs, not {jnp.dtype(dtype).name}'
  if head_dim % 8 or head_dim > 256:
    return f'cuDNN attention needs a head dimension that is a multiple of 8 up to 256, not {head_dim}'
  if has_segments:
    # jax 0.10.2's packed-segment path picks the wrong keys under GQA, and a boolean mask becomes
    # a dense [B, 1, T, T] bias with a dense gradient: neither is what cudnn is for.
    return 'cuDNN attention in jax 0.10.2 cannot mask packed documents apart correctly'
  return ''


def choose(implementation, platform, seq_len, dtype, head_dim, has_segments, chunked_from, has_bias=False):
  """(kernel, reason): what `implementation` means on `platform` ('cpu', 'gpu', 'tpu') for this shape."""
  if implementation != 'auto':
    return implementation, f'model.attention_impl={implementation!r}'
  if has_bias and platform in ('tpu', 'gpu'):
    return 'chunked', f'the fused kernel on {platform} takes no bias on the logits (ALiBi, KERPLE)'
  if platform == 'tpu':
    return 'splash', 'the Pallas splash kernel is the fused attention on TPU'
  if platform == 'gpu':
    why_not = cudnn_unsupported(dtype, head_dim, has_segments)
    if not why_not:
      return 'cudnn', "cuDNN's fused attention applies on GPU to this shape and dtype"
  else:
    why_not = f'no fused kernel on {platform}'
  if seq_len >= chunked_from:
    return 'chunked', f'{why_not}, and {seq_len} tokens >= model.attention_chunked_from={chunked_from}'
  return 'xla', f'{why_not}, and {seq_len} tokens < model.attention_chunked_from={chunked_from}'


def default_block(kernel, platform) -> int:
  """The block size where model.attention_block = 0. Chunked on CPU: 64, the fastest measured at 256 to
  1024 tokens (one layer forward and backward, width 256: 12.1 ms against 20.8 ms for xla at 256
  tokens, 45 against 110 ms at 512; `bench/attention_kernels.py --cpu-blocks`, bench/README.md);
  elsewhere 512, as before (splash blocks are multiples of the TPU's 128 lanes)."""
  return 64 if kernel == 'chunked' and platform == 'cpu' else 512


def kernel_for_run(cfg, platform):
  """(kernel, reason) for a run's config on `platform`; ConfigError where the chosen kernel cannot run there."""
  m = cfg.model
  kernel, reason = choose(m.attention_impl, platform, cfg.data.seq_len, m.dtype, config.head_dim(cfg),
                          cfg.data.separate_documents, m.attention_chunked_from,
                          has_bias=m.position in ('alibi', 'kerple'))
  if kernel == 'cudnn' and platform != 'gpu':
    raise config.ConfigError(f"model.attention_impl='cudnn' needs a GPU but this run's devices are {platform}; "
                             'set model.attention_impl=auto or chunked.')
  if kernel == 'splash' and platform != 'tpu':
    reason += f' (interpreted on {platform}: correct but slow, meant for tests)'
  return kernel, reason


def current_platform() -> str:
  """The platform of the mesh being traced for (a TPU topology compiled from a CPU host counts as TPU)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT=None, implementation='xla',
           block_size=0, chunked_from=256, rules=None, positions_BxT=None, bias=None):
  """Causal attention with grouped-query heads (K divides H); documents masked apart by segment ids.

  block_size 0 = default_block for the kernel that runs.
  q arrives already multiplied by the temperature; every kernel applies 1/sqrt(Dh), then adds
  `bias` if given: (fn, params) with fn(params, q_positions_BxQ, k_positions_BxS) -> bias_BxHxQxS,
  evaluated at `positions_BxT` (positions.bias).
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  platform = current_platform()
  kernel, _ = choose(implementation, platform, T, q_BxTxHxDh.dtype, Dh,
                     segment_ids_BxT is not None, chunked_from, has_bias=bias is not None)
  block_size = block_size or default_block(kernel, platform)
  if bias is not None and positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  if kernel == 'chunked':
    return flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, block_size, positions_BxT, bias)
  if bias is not None:
    if kernel in ('splash', 'cudnn'):
      raise ValueError(f'the {kernel} kernel takes no bias on the logits; use model.attention_impl=auto, chunked or xla.')
    fn, params = bias
    mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT)
    return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, bias=fn(params, positions_BxT, positions_BxT),
                                        mask=mask, is_causal=True, implementation='xla')
  if kernel == 'splash':
    return splash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, block_size, rules)
  if kernel == 'cudnn':
    why_not = cudnn_unsupported(q_BxTxHxDh.dtype, Dh, segment_ids_BxT is not None)
    if why_not:
      raise ValueError(f'{why_not}; use model.attention_impl=auto or chunked.')
    return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, is_causal=True, implementation='cudnn')
  mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT)
  return jax.nn.dot_product_attention(
      q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask=mask, is_causal=True, implementation='xla')


# ---------------------------------------------------------------------------------------------
# chunked: flash attention in plain JAX (FlashAttention-2's schedule, forward and backward).
# Query block i sees key blocks 0..i only (equal block sizes, causal), so the loops skip the
# masked upper triangle. Padding to a multiple of the block adds keys after every real query
# (the causal mask hides them) and queries whose rows are dropped.


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

  with_kv=False leaves out dk and dv (returned as None): two of the five block products.
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


# ---------------------------------------------------------------------------------------------
# splash: the Pallas TPU kernel (interpreted on other platforms, for tests).


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


# ---------------------------------------------------------------------------------------------
# Long-context path: evaluation at many times the training length, and cached decoding.
# Queries are processed a chunk at a time, so only one chunk's [heads, chunk, keys] softmax
# exists at once: memory grows linearly with the length, not with its square.


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
