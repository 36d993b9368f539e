"""Peak memory of the evaluation at 1x, 4x and 16x the training length: linear in the length, not square.

  .venv/bin/python bench/eval_memory.py                 # configs/tiny.py (L = 64): 64, 256, 1024
  .venv/bin/python bench/eval_memory.py --config 1b     # configs/1b.py (L = 2048): 2K, 8K, 32K (~5 min on 2 cores)
  .venv/bin/python bench/eval_memory.py --batch 1       # rows per forward pass (default eval.batch_size)

Each evaluation function is compiled ahead of time on abstract arrays for one device (nothing is
allocated, so 1B at 32K compiles on a laptop) and XLA's buffer assignment is read back:
`temp` is the scratch memory the computation needs beyond its inputs (the weights) and outputs.
For contrast, the training forward pass (`model(tokens)`, whose attention forms [B, H, n, n]) is
compiled at the same lengths. A length 4x longer should cost about 4x the temp memory on the
chunked path and 16x on the training path.
"""
import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
from nopejax.evaluate import entropy, passkey, perplexity  # noqa: E402
from nopejax.model import Transformer  # noqa: E402


def temp_bytes(jitted, *args, **static) -> int:
  return jitted.lower(*args, **static).compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='tiny')
  parser.add_argument('--batch', type=int, default=0, help='Rows per forward pass; 0 = eval.batch_size.')
  parser.add_argument('--multiples', default='1,4,16')
  args = parser.parse_args()
  cfg = common.load_config(args.config)
  L, B, chunk = cfg.data.seq_len, args.batch or cfg.eval.batch_size, cfg.eval.query_chunk
  stride = cfg.eval.stride or max(1, min(256, L // 4))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))

  def tokens(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)

  print(f'{args.config}: {cfg.model.num_layers} layers, width {cfg.model.embed_dim}, {cfg.model.num_heads} heads, '
        f'vocab {cfg.model.vocab_size}, {cfg.model.dtype}; training length {L}; {B} rows per pass; '
        f'query chunk {chunk}; stride {stride}; device {jax.devices()[0].device_kind}')
  print('| length | perplexity windows MiB | entropy + loss-by-position MiB | passkey prefill + decode MiB '
        '| training forward (n x n attention) MiB |')
  print('|---|---|---|---|---|')
  rows = []
  for multiple in (int(m) for m in args.multiples.split(',')):
    n = multiple * L
    start = time.perf_counter()
    ppl = temp_bytes(perplexity._window_nll, graphdef, state, tokens(B, n), scored=stride, query_chunk=chunk)
    stats = temp_bytes(entropy._position_stats, graphdef, state, tokens(B, n + 1),
                       jax.ShapeDtypeStruct((B,), jnp.float32), query_chunk=chunk)
    passkey = temp_bytes(passkey._greedy, graphdef, state, tokens(B, n), tokens(B), steps=6, query_chunk=chunk)
    full = temp_bytes(forward, state, tokens(B, n))
    rows.append((n, ppl, stats, passkey, full))
    print(f'| {n} ({multiple}x) | {ppl / 2**20:,.1f} | {stats / 2**20:,.1f} | {passkey / 2**20:,.1f} '
          f'| {full / 2**20:,.1f} |  ({time.perf_counter() - start:.0f} s to compile)', flush=True)
  if len(rows) >= 2:
    (n0, *small), (n1, *large) = rows[-2], rows[-1]
    ratios = ', '.join(f'{b / a:.1f}x' for a, b in zip(small, large))
    print(f'{n1} / {n0} tokens: temp memory grows {ratios} (same column order); '
          f'linear would be {n1 / n0:.0f}x, square {(n1 / n0) ** 2:.0f}x')


if __name__ == '__main__':
  main()
