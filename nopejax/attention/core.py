"""One attention core: the per-head temperature scales q, then one of several causal attention kernels runs.

Scaling q (not the logits, not k) keeps any fused attention kernel usable unchanged and leaves
cached keys unscaled; q * c_h then the usual 1/sqrt(d) gives logits * c_h / sqrt(d).

Kernels (`model.attention_impl`), all causal with packed documents masked apart by segment ids and
grouped-query heads (head h reads kv head h // (H/K)); all but splash and cudnn also add a bias on
the logits (ALiBi, positions.bias), evaluated from positions block by block:
  xla      jax.nn.dot_product_attention: forms the [B, H, T, T] logits; the reference.
  chunked  plain JAX flash attention (chunked.py): blocks of queries against blocks of keys with an online
           softmax and a custom VJP that saves only the output and the log-sum-exp per query, so
           memory grows linearly with T forward and backward. Runs on every backend.
  splash   the Pallas TPU splash attention kernel, under shard_map over the mesh (platform.py).
  cudnn    cuDNN's fused attention on GPU (bfloat16, causal, no segment mask).
  auto     splash on TPU, cudnn on GPU where it applies, else chunked from a length threshold, xla below;
           with a bias, chunked in place of splash and cudnn (they take no bias here).
"""
import math

import jax
import jax.numpy as jnp

from nopejax import config
from nopejax.attention.chunked import flash_attention
from nopejax.attention.platform import cudnn_unsupported, current_platform, splash_attention


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
  """The block size where model.attention_block = 0. Chunked on CPU: 64, the fastest at 256 to 1024
  tokens (`bench/attention_kernels.py --cpu-blocks`); elsewhere 512 (splash blocks are multiples of
  the TPU's 128 lanes)."""
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
