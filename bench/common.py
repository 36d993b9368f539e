"""Shared by the benchmarks: build a config's jitted train step on the mesh, time it, size its memory."""
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # Run as `python bench/X.py` from anywhere.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nopejax import config, optim, sharding, step as step_lib  # noqa: E402


def load_config(name):
  """configs/NAME.py's get_config() (file names such as 1b.py are not importable modules)."""
  return config.from_file(ROOT / 'configs' / f'{name}.py')


def abstract_batch(cfg, batch_sharding):
  B, T = cfg.train.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sharding)
           for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  batch['loss_mask'] = jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=batch_sharding)
  return batch


def tpu_devices(topology_name):
  """The devices of a TPU slice such as 'v5e:2x4', from libtpu's topology description (no TPU needed)."""
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform='tpu', topology_name=topology_name, chip_config_name='default',
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices


def compiled_step(cfg, devices=None):
  """(mesh, compiled train step, abstract state, abstract batch) for cfg, compiled ahead of time
  for `devices` (default: the local ones; tpu_devices(...) compiles for a TPU slice)."""
  mesh = sharding.make_mesh(cfg, devices)
  tx = optim.make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, abstract, shardings = step_lib.abstract_state(cfg, mesh, tx)
    batch_sharding = sharding.batch_sharding(mesh, cfg.mesh.rules)
    batch = abstract_batch(cfg, batch_sharding)
    step = jax.jit(step_lib.make_train_step(cfg, graphdef, tx), in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)
    return mesh, step.lower(abstract, batch).compile(), (tx, shardings), batch


def memory_bytes(compiled) -> dict:
  """XLA's buffer assignment for one device: arguments, outputs, temporaries (activations, gradients)."""
  stats = compiled.memory_analysis()
  return {'argument': stats.argument_size_in_bytes, 'output': stats.output_size_in_bytes,
          'temp': stats.temp_size_in_bytes, 'alias': stats.alias_size_in_bytes}


def time_step(cfg, steps=20, warmup=3) -> float:
  """Median seconds per train step on random tokens (reads the loss back every step)."""
  mesh, compiled, (tx, shardings), batch_spec = compiled_step(cfg)
  with jax.set_mesh(mesh):
    state = step_lib.init_state(cfg, shardings, tx)
    tokens = jax.random.randint(jax.random.key(0), (cfg.train.batch_size, cfg.data.seq_len + 1), 0,
                                cfg.model.vocab_size)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
             'segment_ids': jnp.ones_like(tokens[:, 1:]), 'positions': jnp.broadcast_to(jnp.arange(cfg.data.seq_len), tokens[:, 1:].shape),
             'loss_mask': jnp.ones(tokens[:, 1:].shape, jnp.float32)}
    batch = jax.device_put(batch, batch_spec['inputs'].sharding)
    seconds = []
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      float(metrics['loss'])
      if i >= warmup:
        seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)
