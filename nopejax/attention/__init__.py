"""Causal attention with per-head query temperatures: the core and its kernels.

  core          query temperatures, which kernel runs, and `attend`, which runs it
  chunked       the plain-JAX flash attention kernel with its custom VJP
  platform      the fused kernels: splash on TPU, cuDNN on GPU
  long_context  attention a query chunk at a time, and the KV cache, for long evaluation and decoding
"""
from nopejax.attention.chunked import flash_attention
from nopejax.attention.core import (attend, choose, default_block, kernel_for_run, query_temperatures, scale_queries,
                                    segment_mask)
from nopejax.attention.long_context import attend_chunked, attend_rows, write_cache
from nopejax.attention.platform import cudnn_unsupported, current_platform, splash_attention

__all__ = ['attend', 'attend_chunked', 'attend_rows', 'choose', 'cudnn_unsupported', 'current_platform',
           'default_block', 'flash_attention', 'kernel_for_run', 'query_temperatures', 'scale_queries',
           'segment_mask', 'splash_attention', 'write_cache']
