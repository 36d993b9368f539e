"""Shared by the benchmarks: build a config's jitted train step on the mesh, time it, size its memory."""
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # Run as `python bench/X.py` from anywhere.

from nopejax import host  # noqa: E402

host.keep_cpu_buffers()  # As every nopejax command line does, before jax starts (CPU only).

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nopejax import config, step as step_lib  # noqa: E402
from nopejax.plan import abstract_batch, compiled_step, tpu_devices  # noqa: E402,F401  (the benchmarks' names for them)


def load_config(name):
  """configs/NAME.py's get_config() (file names such as 1b.py are not importable modules)."""
  return config.from_file(ROOT / 'configs' / f'{name}.py')


def memory_bytes(compiled) -> dict:
  """XLA's buffer assignment for one device: arguments, outputs, temporaries (activations, gradients)."""
  stats = compiled.memory_analysis()
  return {'argument': stats.argument_size_in_bytes, 'output': stats.output_size_in_bytes,
          'temp': stats.temp_size_in_bytes, 'alias': stats.alias_size_in_bytes}


def measure_matmul_flops(dtype, size=2048, repeats=5) -> float:
  """Best FLOP/s of a square matmul on the first device: a practical peak where no data sheet applies."""
  x = jnp.ones((size, size), dtype, device=jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def time_step(cfg, steps=20, warmup=3) -> float:
  """Median seconds per train step on random tokens (reads the loss back every step)."""
  return time_steps([cfg], steps, warmup)[0]


def time_steps(cfgs, steps=20, warmup=3, turn=5) -> list:
  """Median seconds per train step of each config (same mesh, batch and shape) on random tokens,
  reading the loss back every step. Several configs take turns of `turn` steps, so that a slow spell
  of the machine weighs on each alike and their ratio holds; the first step of a turn is not timed
  (it starts with the caches full of the other step's data)."""
  runs = []
  for cfg in cfgs:
    mesh, compiled, (tx, shardings), batch_spec = compiled_step(cfg)
    with jax.set_mesh(mesh):
      runs.append([compiled, step_lib.init_state(cfg, shardings, tx)])
  cfg = cfgs[0]
  with jax.set_mesh(mesh):
    tokens = jax.random.randint(jax.random.key(0), (cfg.train.batch_size, cfg.data.seq_len + 1), 0,
                                cfg.model.vocab_size)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
             'segment_ids': jnp.ones_like(tokens[:, 1:]), 'positions': jnp.broadcast_to(jnp.arange(cfg.data.seq_len), tokens[:, 1:].shape),
             'loss_mask': jnp.ones(tokens[:, 1:].shape, jnp.float32)}
    batch = jax.device_put(batch, batch_spec['inputs'].sharding)

    def step(run):
      start = time.perf_counter()
      run[1], metrics = run[0](run[1], batch)
      float(metrics['loss'])
      return time.perf_counter() - start

    for run in runs:
      for _ in range(warmup):
        step(run)
    if len(runs) == 1:
      return [statistics.median(step(runs[0]) for _ in range(steps))]
    seconds = [[] for _ in runs]
    while len(seconds[-1]) < steps:
      for run, times in zip(runs, seconds):
        step(run)
        times.extend(step(run) for _ in range(turn - 1))
  return [statistics.median(times) for times in seconds]
