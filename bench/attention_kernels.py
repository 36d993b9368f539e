"""Attention kernels: XLA temporary memory of the tiny search step by length, and step time; the 1B
search compiled for a TPU v5e 2x4 slice with splash at 8K, 16K and 32K tokens.

  .venv/bin/python bench/attention_kernels.py           # memory at 1K, 4K, 16K; time at 256 and 1K
  JAX_PLATFORMS=cpu .venv/bin/python bench/attention_kernels.py --tpu   # needs libtpu (make setup-tpu)
  XLA_FLAGS=--xla_force_host_platform_device_count=1 .venv/bin/python bench/attention_kernels.py --cpu-blocks

Memory is XLA's buffer assignment for one of the 8 simulated devices, compiled ahead of time on
abstract arrays (so 16K tokens with `xla`, whose logits alone are 8 x 4 x 16K x 16K floats, is
sized without being run). `xla` forms the [B, H, T, T] logits; `chunked` keeps memory linear in T.
"""
import statistics
import sys
import time

import common
import jax
import jax.numpy as jnp

from nopejax import attention, sharding


def search_config(seq_len, implementation):
  cfg = common.load_config('tiny_search')
  cfg.search.base = ''
  cfg.data.seq_len = seq_len
  cfg.model.attention_impl = implementation
  return cfg


def tpu_search_memory(topology='v5e:2x4', lengths=(8192, 16384, 32768)):
  print(f'\n1b_search compiled for {topology} with splash (per chip, GiB):')
  print('| length | arguments | temporaries | outputs (aliased) | compile s |')
  print('|---|---|---|---|---|')
  for seq_len in lengths:
    cfg = common.load_config('1b_search')
    cfg.search.base = ''
    cfg.data.seq_len = seq_len
    cfg.model.attention_impl = 'splash'
    start = time.perf_counter()
    memory = common.memory_bytes(common.compiled_step(cfg, common.tpu_devices(topology))[1])
    print(f'| {seq_len:,} | {memory["argument"] / 2**30:.2f} | {memory["temp"] / 2**30:.2f} | '
          f'{memory["output"] / 2**30:.2f} ({memory["alias"] / 2**30:.2f}) | {time.perf_counter() - start:.0f} |', flush=True)


def cpu_blocks(shapes=((8, 128, 4, 64), (8, 256, 4, 64), (4, 512, 8, 64), (8, 1024, 4, 64)), blocks=(32, 64, 128)):
  """One attention layer's forward and backward on this CPU, ms: xla against chunked by block size
  (what attention.default_block and model.attention_chunked_from rest on)."""
  options = sharding.CPU_COMPILER_OPTIONS  # As the train step compiles on CPU.
  print('| batch x tokens x heads x head dim | xla | ' + ' | '.join(f'chunked, {b}-token blocks' for b in blocks) + ' |')
  print('|---|---|' + '---|' * len(blocks))
  for B, T, H, Dh in shapes:
    q, k, v, dout = (jax.random.normal(key, (B, T, H, Dh)) for key in jax.random.split(jax.random.key(0), 4))
    cells = []
    for impl, block in [('xla', 0)] + [('chunked', b) for b in blocks]:
      loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, None, impl, block) * dout)
      grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=options)
      jax.block_until_ready(grads(q, k, v))
      seconds = []
      for _ in range(20):
        start = time.perf_counter()
        jax.block_until_ready(grads(q, k, v))
        seconds.append(time.perf_counter() - start)
      cells.append(f'{1000 * statistics.median(seconds):.1f}')
    print(f'| {B} x {T} x {H} x {Dh} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  if '--cpu-blocks' in sys.argv:
    cpu_blocks()
    sys.exit()
  if '--tpu' in sys.argv:
    tpu_search_memory()
    sys.exit()
  print('| length | xla temp MiB | chunked temp MiB |')
  print('|---|---|---|')
  chunked_by_length = {}
  for seq_len in (1024, 4096, 16384):
    temps = [common.memory_bytes(common.compiled_step(search_config(seq_len, impl))[1])['temp'] / 2**20
             for impl in ('xla', 'chunked')]
    chunked_by_length[seq_len] = temps[1]
    print(f'| {seq_len:,} | {temps[0]:,.1f} | {temps[1]:,.1f} |', flush=True)
  print(f'chunked memory growth 1K -> 4K: {chunked_by_length[4096] / chunked_by_length[1024]:.2f}x, '
        f'4K -> 16K: {chunked_by_length[16384] / chunked_by_length[4096]:.2f}x')
  print('\n| length | xla s/step | chunked s/step | chunked / xla |')
  print('|---|---|---|---|')
  for seq_len in (256, 1024):
    xla, chunked = (common.time_step(search_config(seq_len, impl), steps=10) for impl in ('xla', 'chunked'))
    print(f'| {seq_len:,} | {xla:.3f} | {chunked:.3f} | {chunked / xla:.2f} |', flush=True)
