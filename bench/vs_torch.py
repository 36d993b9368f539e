"""nopejax's train step against Hugging Face transformers' LlamaForCausalLM, side by side on this CPU.

  make bench                                  # sets up both environments, then runs this
  .venv/bin/python bench/vs_torch.py          # the driver; torch runs in .venv-bench (pyproject's bench extra)

The driver starts one process per measurement, so each side gets the machine alone and the 1- and
8-device nopejax runs each get their own XLA_FLAGS; the sides take turns, --repeats times (3), and
each reports its median run:
  - nopejax pretrain step on 1 device and on 8 simulated devices, and the search step (only the
    temperatures train) at the first shape;
  - transformers' train step (forward, loss, backward, clip 1.0, AdamW), torch CPU, 2 threads;
  - the best float32 2048 x 2048 matmul rate of either library, the peak behind MFU.
Both sides: the same shapes, random tokens, AdamW (0.9, 0.95, weight decay 0.1), grad clip 1.0,
SwiGLU width 3 x D, no tied embeddings, float32, one causal sequence per row (no packed-document
mask: transformers has none). The last line is the ratio of tokens/s, nopejax over torch, for the
first shape on 1 device.
"""
import argparse
import copy
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (layers, width, heads, tokens, batch): a small and a wider shape.
SHAPES = ((4, 256, 4, 256, 8), (4, 512, 8, 512, 4))
VOCAB = 256


def _timed(run_step, steps, warmup):
  """Median seconds of run_step() (which must block until its result is ready)."""
  seconds = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    run_step()
    if i >= warmup:
      seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def jax_side(shape, steps, search, overrides=()):
  """Seconds per pretrain (and search) step at `shape`; overrides: (dotted config key, value) pairs."""
  sys.path.insert(0, str(ROOT / 'bench'))
  import common  # Sets nothing once XLA_FLAGS is given; puts the repository on sys.path.
  import jax
  import jax.numpy as jnp
  layers, width, heads, tokens, batch = shape
  cfg = common.load_config('tiny')
  cfg.model.num_layers, cfg.model.embed_dim, cfg.model.num_heads = layers, width, heads
  cfg.model.num_kv_heads, cfg.model.mlp_dim, cfg.model.vocab_size = heads, 3 * width, VOCAB
  cfg.data.seq_len, cfg.train.batch_size = tokens, batch
  cfg.data.separate_documents = False
  cfg.train.weight_decay, cfg.train.clip_norm = 0.1, 1.0
  # Rows over as many devices as the batch allows; heads (tensor) over the rest: 8 x 4 -> (4, 1, 2).
  cfg.mesh.data = math.gcd(batch, jax.device_count())
  cfg.mesh.tensor = jax.device_count() // cfg.mesh.data
  for key, value in overrides:
    section, name = key.split('.')
    cfg[section][name] = value
  if search:  # The search step (only the temperatures train) taking turns with the pretrain step.
    search_cfg = copy.deepcopy(cfg)
    search_cfg.train.trainable = 'temperature'
    result = dict(zip(('pretrain_s', 'search_s'), common.time_steps([cfg, search_cfg], steps=steps)))
  else:
    result = {'pretrain_s': common.time_step(cfg, steps=steps)}
  result['matmul_flops'] = common.measure_matmul_flops(jnp.float32)
  return result


def torch_side(shape, steps):
  import torch
  import transformers
  torch.set_num_threads(2)
  torch.manual_seed(0)
  layers, width, heads, tokens, batch = shape
  llama = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=tokens,
      tie_word_embeddings=False, attn_implementation='sdpa')
  model = transformers.LlamaForCausalLM(llama).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
  inputs = torch.randint(0, VOCAB, (batch, tokens))

  def step():
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()

  x = torch.randn(2048, 2048)
  matmul_s = min(_timed(lambda: torch.mm(x, x), 1, 1) for _ in range(5))
  return {'train_s': _timed(step, steps, 3), 'matmul_flops': 2 * 2048**3 / matmul_s,
          'torch': torch.__version__, 'transformers': transformers.__version__}


def median_run(results):
  """The run whose step time ('train_s' or 'pretrain_s') is the median of the runs'."""
  return sorted(results, key=lambda r: r.get('train_s', r.get('pretrain_s')))[len(results) // 2]


def run_child(python, args, devices=1):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3')
  out = subprocess.run([str(python), __file__, *args], env=env, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--side', choices=('driver', 'jax', 'torch'), default='driver')
  parser.add_argument('--shape', type=int, default=0)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--search', action='store_true')
  parser.add_argument('--repeats', type=int, default=3)  # Runs of each side; the median run is reported.
  parser.add_argument('--torch_python', default=str(ROOT / '.venv-bench' / 'bin' / 'python'))
  args = parser.parse_args()
  if args.side == 'jax':
    print(json.dumps(jax_side(SHAPES[args.shape], args.steps, args.search)))
    return
  if args.side == 'torch':
    print(json.dumps(torch_side(SHAPES[args.shape], args.steps)))
    return

  rows, peak = [], 0.0
  for index, shape in enumerate(SHAPES):
    common_args = ['--shape', str(index), '--steps', str(args.steps)]
    search = ['--search'] if index == 0 else []
    # Processes on this machine differ by up to 10% run to run: the three sides take turns, and each
    # keeps its median run (by its pretrain step; the search ratio comes from that same run).
    runs = {'torch': [], 'one': [], 'eight': []}
    for _ in range(args.repeats):
      runs['torch'].append(run_child(args.torch_python, ['--side', 'torch', *common_args]))
      runs['one'].append(run_child(sys.executable, ['--side', 'jax', *common_args, *search], 1))
      runs['eight'].append(run_child(sys.executable, ['--side', 'jax', *common_args, *search], 8))
    torch_result, one, eight = (median_run(runs[side]) for side in ('torch', 'one', 'eight'))
    peak = max([peak] + [r['matmul_flops'] for side in ('torch', 'one') for r in runs[side]])
    rows.append((shape, torch_result, one, eight))

  print(f'torch {rows[0][1]["torch"]}, transformers {rows[0][1]["transformers"]}; '
        f'best float32 2048^3 matmul in this run: {peak / 1e9:.0f} GFLOP/s (the MFU peak)')
  print('| layers x width, heads | batch x tokens | side | ms/step | tokens/s | vs torch | MFU |')
  print('|---|---|---|---|---|---|---|')
  ratio_first = None
  for shape, torch_result, one, eight in rows:
    layers, width, heads, tokens, batch = shape
    # 6 FLOPs per weight and token (the embedding lookup is no matmul) plus causal attention's 12 L T D.
    weights = layers * (4 * width * width + 3 * width * 3 * width) + width * VOCAB
    flops_per_token = 6 * weights + 12 * layers * width * tokens
    label = f'| {layers} x {width}, {heads} | {batch} x {tokens} '
    for side, seconds in (('transformers (torch)', torch_result['train_s']), ('nopejax, 1 device', one['pretrain_s']),
                          ('nopejax, 8 simulated devices', eight['pretrain_s'])):
      tokens_per_s = batch * tokens / seconds
      ratio = torch_result['train_s'] / seconds
      print(f'{label}| {side} | {1000 * seconds:.1f} | {tokens_per_s:,.0f} | {ratio:.2f}x '
            f'| {100 * tokens_per_s * flops_per_token / peak:.1f}% |')
    if 'search_s' in one:
      print(f'{label}| search step / pretrain step | 1 device {one["search_s"] / one["pretrain_s"]:.2f}, '
            f'8 devices {eight["search_s"] / eight["pretrain_s"]:.2f} | | | |')
    if ratio_first is None:
      ratio_first = torch_result['train_s'] / one['pretrain_s']
  print(f'nopejax/torch tokens-per-sec ratio: {ratio_first:.2f}')


if __name__ == '__main__':
  main()
