"""Peak host memory and time of `nopejax.convert from-hf` / `to-hf` on a generated sharded Llama checkpoint.

  .venv/bin/python bench/convert_memory.py            # about 310 MB of bfloat16 in 4 shards
  .venv/bin/python bench/convert_memory.py --layers 4 --shard_mb 50
  .venv/bin/python bench/convert_memory.py --phases   # resident memory after each phase of from-hf

Writes a random Llama (vocab 32000, width 1024, 16 / 4 heads, SwiGLU 2816, bfloat16) with
model.safetensors.index.json into a temporary directory, then runs each command in a fresh
process and reports its peak resident memory (ru_maxrss) and wall time, beside the same for a
process that only imports nopejax and starts the 8 simulated devices.
"""
import argparse
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from nopejax import convert  # noqa: E402


def write_checkpoint(out, layers, shard_mb, vocab=32000, width=1024, heads=16, kv_heads=4, mlp=2816):
  """A random bfloat16 Llama in shards of about shard_mb MiB, written one shard at a time."""
  head_dim = width // heads
  shapes = {'model.embed_tokens.weight': (vocab, width), 'model.norm.weight': (width,), 'lm_head.weight': (vocab, width)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    shapes.update({p + 'input_layernorm.weight': (width,), p + 'post_attention_layernorm.weight': (width,),
                   p + 'self_attn.q_proj.weight': (heads * head_dim, width),
                   p + 'self_attn.k_proj.weight': (kv_heads * head_dim, width),
                   p + 'self_attn.v_proj.weight': (kv_heads * head_dim, width),
                   p + 'self_attn.o_proj.weight': (width, heads * head_dim),
                   p + 'mlp.gate_proj.weight': (mlp, width), p + 'mlp.up_proj.weight': (mlp, width),
                   p + 'mlp.down_proj.weight': (width, mlp)})
  groups = convert.safetensors_files.shard_groups([(n, math.prod(s) * 2) for n, s in shapes.items()], shard_mb * 2**20)
  rng = np.random.default_rng(0)
  weight_map = {}
  for i, names in enumerate(groups):
    file_name = f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
    convert.write_safetensors(os.path.join(out, file_name), {
        n: (0.02 * rng.standard_normal(shapes[n], np.float32)).astype(ml_dtypes.bfloat16) for n in names})
    weight_map.update({n: file_name for n in names})
  with open(os.path.join(out, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': vocab, 'hidden_size': width,
            'intermediate_size': mlp, 'num_hidden_layers': layers, 'num_attention_heads': heads,
            'num_key_value_heads': kv_heads, 'hidden_act': 'silu', 'rms_norm_eps': 1e-5, 'rope_theta': 10000.0,
            'max_position_embeddings': 2048, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16'}
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(config, f)
  return sum(math.prod(s) for s in shapes.values()), len(groups)


def measure(args):
  """(peak RSS MiB, seconds) of `python args...` in a fresh process (one measured child at a time)."""
  start = time.perf_counter()
  pid = subprocess.Popen([sys.executable] + args, cwd=ROOT).pid
  _, status, usage = os.wait4(pid, 0)
  if status:
    raise SystemExit(f'{args} failed with status {status}')
  return usage.ru_maxrss / 1024, time.perf_counter() - start


def resident_mib():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def phases(hf_dir, workdir):
  """from-hf's two phases in this process: resident memory after placing the tensors, after saving."""
  import jax
  from nopejax import checkpoint
  jax.devices()
  print(f'imports + 8 devices: resident {resident_mib():,.0f} MiB')
  with open(os.path.join(hf_dir, 'config.json')) as f:
    cfg = convert.config_from_hf(json.load(f), False, hf_dir)
  state, _ = convert.read_hf_state(cfg, hf_dir, convert.conversion_mesh(cfg))
  print(f'every tensor on the mesh: resident {resident_mib():,.0f} MiB')
  checkpoint.save_weights(workdir, cfg, state)
  print(f'checkpoint written: resident {resident_mib():,.0f} MiB, '
        f'peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--shard_mb', type=int, default=100)
  parser.add_argument('--phases', action='store_true', help='measure the phases of from-hf in this process')
  parser.add_argument('--write_only', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.write_only:
    write_checkpoint(args.write_only, args.layers, args.shard_mb)
    return
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, workdir, back = (os.path.join(tmp, n) for n in ('hf', 'workdir', 'back'))
    os.makedirs(hf_dir)
    if args.phases:  # The checkpoint is written by a child, so its buffers do not count here.
      subprocess.run([sys.executable, __file__, '--write_only', hf_dir, '--layers', str(args.layers),
                      '--shard_mb', str(args.shard_mb)], check=True)
      return phases(hf_dir, workdir)
    params, shards = write_checkpoint(hf_dir, args.layers, args.shard_mb)
    print(f'checkpoint: {params:,} parameters, {params * 2 / 2**20:,.0f} MiB bfloat16 in {shards} shards; '
          f'float32 on the mesh: {params * 4 / 2**20:,.0f} MiB')
    baseline = measure(['-c', 'import jax, nopejax.convert, nopejax.checkpoint; jax.devices()'])
    print(f'imports + 8 devices only: peak RSS {baseline[0]:,.0f} MiB, {baseline[1]:.1f} s')
    rss, seconds = measure(['-m', 'nopejax.convert', 'from-hf', '--hf_dir', hf_dir, '--workdir', workdir])
    print(f'from-hf: peak RSS {rss:,.0f} MiB, {seconds:.1f} s')
    rss, seconds = measure(['-m', 'nopejax.convert', 'to-hf', '--workdir', workdir, '--hf_dir', back,
                            '--max_shard_mb', str(args.shard_mb)])
    print(f'to-hf:   peak RSS {rss:,.0f} MiB, {seconds:.1f} s')


if __name__ == '__main__':
  main()
