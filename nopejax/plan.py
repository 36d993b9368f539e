"""Will a config run on a TPU slice? Compiles its train step (pretraining or the search, as
train.trainable says) for the slice's chips from any machine, and prints what one chip holds.

  python -m nopejax.plan --config configs/1b.py --topology v5e-256 [--config.key=value ...] [--json]
  python -m nopejax.plan --config configs/1b_search.py --topology v5e-8 --config.data.seq_len=32768

--topology names a slice as Cloud TPU does: v5e-N and v6e-N count chips, v4-N and v5p-N count
TensorCores (two per chip). Without it, the step compiles for this machine's devices. Compiling for
a TPU needs the libtpu package (`make plan`, or pip install -e '.[tpu]'), no TPU.
"""
import json
import math
import re
import tempfile
import time

from absl import app, flags

from nopejax import cli

_TOPOLOGY = flags.DEFINE_string('topology', '', 'TPU slice such as v5e-256, v4-64, v5p-128, v6e-8; empty: the local devices.')
_JSON = flags.DEFINE_bool('json', False, 'Print the report as one JSON object.')
_BUFFERS = flags.DEFINE_integer('buffers', 10, 'How many of the largest arrays live at the memory peak to list.')

GiB = 2**30
# HBM per chip (a v4 or v5p chip's two cores share it as one megacore device).
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
# HBM bytes/s per chip, from Cloud TPU's system architecture pages: with the chip's peak FLOP/s
# (metrics.PEAK_FLOPS), the roofline that estimates a step's time.
HBM_BANDWIDTH = {'v4': 1200e9, 'v5e': 819e9, 'v5p': 2765e9, 'v6e': 1638e9}
# Chips along each torus axis: v4 and v5p slices are 3D, v5e and v6e 2D.
TORUS_DIMS = {'v4': 3, 'v5p': 3, 'v5e': 2, 'v6e': 2}


def parse_topology(name: str) -> dict:
  """'v5e-256' -> {'generation', 'chips', 'topology_name' ('v5e:16x16'), 'chip_config', 'host_bounds', 'hbm_bytes'}."""
  from nopejax.config import ConfigError
  match = re.fullmatch(r'(v4|v5e|v5litepod|v5p|v6e)-(\d+)', name.strip().lower())
  if not match:
    raise ConfigError(f'--topology={name} is not a TPU slice name; write GENERATION-SIZE, e.g. v5e-256, v4-64, '
                      'v5p-128 or v6e-8.')
  generation = 'v5e' if match[1] == 'v5litepod' else match[1]
  size = int(match[2])
  per_chip = 2 if generation in ('v4', 'v5p') else 1  # Their slice names count TensorCores.
  chips = size // per_chip
  smallest = 4 if per_chip == 2 else 1
  if size % per_chip or chips < smallest or chips & (chips - 1):
    unit = 'TensorCores (two per chip), from 8' if per_chip == 2 else 'chips, from 1'
    raise ConfigError(f'--topology={name} is no {generation} slice: its size counts {unit}, a power of two; '
                      f'e.g. {generation}-{8 if per_chip == 2 else 8}.')
  # A slice's torus: double the smallest axis (the last of equals) until the chips are placed,
  # which gives Cloud TPU's shapes (v4-8 2x2x1, v4-32 2x2x4, v5e-8 2x4, v5e-256 16x16).
  dims = [2, 2, 1] if TORUS_DIMS[generation] == 3 else [1, 1]
  while math.prod(dims) < chips:
    i = max(i for i, d in enumerate(dims) if d == min(dims))
    dims[i] *= 2
  host_bounds = tuple(min(2, d) for d in dims) + (1,) * (3 - len(dims))
  return {'generation': generation, 'chips': chips, 'topology_name': f'{generation}:{"x".join(map(str, dims))}',
          'chip_config': 'megacore' if per_chip == 2 else 'default', 'host_bounds': host_bounds,
          'hbm_bytes': HBM_GIB[generation] * GiB}


def tpu_devices(topology_name, chip_config='default', host_bounds=(2, 2, 1)):
  """The devices of a TPU slice such as 'v5e:2x4', from libtpu's topology description (no TPU needed)."""
  from jax.experimental import topologies
  from nopejax.config import ConfigError
  try:
    return topologies.get_topology_desc(platform='tpu', topology_name=topology_name, chip_config_name=chip_config,
                                        chips_per_host_bounds=host_bounds, num_slices=1).devices
  except Exception as e:  # No libtpu, or a topology it rejects.
    if 'tpu' in str(e).lower() and ('not found' in str(e).lower() or 'unknown backend' in str(e).lower()):
      raise ConfigError('Compiling for a TPU slice needs the libtpu package; run `make plan` or '
                        "pip install -e '.[tpu]'.") from e
    raise ConfigError(f'libtpu cannot describe the slice {topology_name} ({" ".join(str(e).split())[:200]}); '
                      'pick another --topology.') from e


def abstract_batch(cfg, batch_sharding):
  import jax
  import jax.numpy as jnp
  B, T = cfg.train.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sharding)
           for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  batch['loss_mask'] = jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=batch_sharding)
  return batch


def compiled_step(cfg, devices=None, compiler_options=None):
  """(mesh, compiled train step, (optimizer, shardings), abstract batch) for cfg, compiled ahead of
  time for `devices` (default: the local ones; tpu_devices(...) compiles for a TPU slice), with
  XLA's `compiler_options` added to the step's own."""
  import jax
  from nopejax import optim, sharding, step as step_lib
  mesh = sharding.make_mesh(cfg, devices)
  tx = optim.make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, abstract, shardings = step_lib.abstract_state(cfg, mesh, tx)
    batch_sharding = sharding.batch_sharding(mesh, cfg.mesh.rules)
    batch = abstract_batch(cfg, batch_sharding)
    step = jax.jit(step_lib.make_train_step(cfg, graphdef, tx), in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0,
                   compiler_options={**(sharding.compiler_options(mesh) or {}), **(compiler_options or {})} or None)
    return mesh, step.lower(abstract, batch).compile(), (tx, shardings), batch


def plan(cfg, topology='', buffers=10) -> dict:
  """Compiles cfg's train step for `topology` (or the local devices) and returns what one chip
  holds, the `buffers` largest arrays live at its memory peak, and a roofline estimate of its time."""
  import jax
  from nopejax import config, hlo, metrics, model, optim, sharding, step as step_lib
  config.validate(cfg)
  if topology:
    slice_ = parse_topology(topology)
    devices = tpu_devices(slice_['topology_name'], slice_['chip_config'], slice_['host_bounds'])
    hbm = slice_['hbm_bytes']
  else:
    devices = jax.devices()
    hbm = (devices[0].memory_stats() or {}).get('bytes_limit') if devices[0].platform != 'cpu' else None
  mesh = sharding.make_mesh(cfg, devices)  # Bad mesh or batch sizes: one sentence before compiling.
  with jax.set_mesh(mesh):
    _, abstract, shardings = step_lib.abstract_state(cfg, mesh, optim.make_optimizer(cfg))
    params = sharding.bytes_per_device(step_lib.model_state(abstract), step_lib.model_state(shardings))
    optimizer = sharding.bytes_per_device(abstract['opt'], shardings['opt'])
    batch = abstract_batch(cfg, sharding.batch_sharding(mesh, cfg.mesh.rules))
  batch_bytes = sharding.bytes_per_device(batch, jax.tree.map(lambda a: a.sharding, batch))
  start, start_cpu = time.perf_counter(), time.process_time()
  peak, step_cost = None, None
  try:
    with tempfile.TemporaryDirectory() as dump:  # XLA's buffer assignment, read by hlo.peak_buffers.
      compiled = compiled_step(cfg, devices, hlo.dump_options(dump))[1]
      peak = hlo.peak_buffers(dump, buffers)
  except Exception as e:  # XLA:TPU refuses a program that does not fit; that is this tool's answer.
    refused = _refused(str(e), params + optimizer + batch_bytes)
    if refused is None:
      raise
    hbm, arguments, temporaries, total = refused
    host_temporaries = None
    flops = float('nan')
    peak = {'heap_bytes': None, 'live_bytes': None, 'buffers': hlo.refusal_buffers(str(e), buffers)}
  else:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', float('nan')))
    text = compiled.as_text()
    step_cost = hlo.step_cost(text, cost, jax.local_devices()[0].client)
    if step_cost and re.search(_KERNEL_CALL, text):
      # XLA counts no FLOPs inside a custom kernel (the attention: Pallas on TPU, cuDNN or Triton on
      # GPU); add attention's as MFU counts them (model.flops_per_token's 12 L H Dh T per token).
      m = cfg.model
      attention = 12.0 * m.num_layers * m.num_heads * config.head_dim(cfg) * cfg.data.seq_len
      step_cost['flops'] += attention * cfg.train.batch_size * cfg.data.seq_len / len(devices)
    arguments, temporaries = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    host_temporaries = getattr(memory, 'host_temp_size_in_bytes', 0)  # model.remat='offload': the layers' inputs.
    # Outputs the step does not write over its donated inputs (the metrics) need their own room.
    total = arguments + temporaries + memory.output_size_in_bytes - memory.alias_size_in_bytes
  compile_seconds, compile_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  tokens = cfg.train.batch_size * cfg.data.seq_len
  model_flops = model.flops_per_token(cfg) * tokens / len(devices)
  chip = (metrics.peak_flops_of(devices[0].device_kind), HBM_BANDWIDTH[slice_['generation']]) if topology else None
  return {
      'topology': topology or f'{len(devices)} x {devices[0].device_kind}',
      'device_kind': devices[0].device_kind,
      'chips': len(devices),
      'mesh': dict(mesh.shape),
      'step': 'search' if cfg.train.trainable == 'temperature' else 'pretrain',
      'batch': f'{cfg.train.batch_size} x {cfg.data.seq_len}',
      'attention': cfg.model.attention_impl,
      'params_bytes': params,
      'optimizer_bytes': optimizer,
      'other_argument_bytes': None if arguments is None else arguments - params - optimizer,  # Batch, step counter.
      'temp_bytes': temporaries,
      'host_temp_bytes': host_temporaries,  # In the host's memory, not HBM (offloaded by model.remat).
      'total_bytes': total,
      'hbm_bytes': hbm,
      'fits': None if hbm is None else total <= hbm,
      'step_flops_per_chip': flops,  # XLA's count; a scanned loop's body counts once.
      # XLA's 'flops' (and attention's inside custom kernels) and 'bytes accessed', loop bodies once per iteration.
      'step_cost_per_chip': step_cost,
      'scan_layers': cfg.model.scan_layers,
      'remat': config.remat_name(cfg.model.remat),
      'model_flops_per_chip': model_flops,
      'roofline': roofline(step_cost, model_flops, *chip) if chip and chip[0] and step_cost else None,
      'heap_bytes': peak and peak['heap_bytes'],  # XLA's temporary heap; temp_bytes adds the backend's own.
      'peak_live_bytes': peak and peak['live_bytes'],
      'peak_buffers': peak and [b._asdict() for b in peak['buffers']],
      'compile_seconds': compile_seconds,
      'compile_cpu_seconds': compile_cpu_seconds,  # All threads: steadier than wall time on a shared machine.
  }


_KERNEL_CALL = r'custom_call_target="(tpu_custom_call|__cudnn\$fmha\w*|__gpu\$xla\.gpu\.triton)"'


def roofline(step_cost, model_flops, peak_flops, bandwidth) -> dict:
  """An estimate of a step's seconds, not a measurement: the longer of its FLOPs at the chip's peak
  and its HBM traffic at full bandwidth. Collectives, kernel launches and imperfect overlap are not
  in it, so real steps are slower; the MFU it implies is an upper bound."""
  compute, memory = step_cost['flops'] / peak_flops, step_cost['bytes accessed'] / bandwidth
  seconds = max(compute, memory)
  return {'compute_seconds': compute, 'memory_seconds': memory, 'step_seconds': seconds,
          'peak_flops': peak_flops, 'hbm_bandwidth': bandwidth, 'mfu': model_flops / (seconds * peak_flops)}


def _size(n_bytes) -> str:
  return f'{n_bytes / GiB:.2f} GiB' if abs(n_bytes) >= GiB / 10 else f'{n_bytes / 2**20:.1f} MiB'


def _refused(message, argument_bytes):
  """(hbm, arguments, temporaries, total) bytes from XLA:TPU's out-of-memory refusal, None for the
  figures it does not give; None for any other error. Two wordings: 'Used 50.70G of 15.75G hbm' and
  'the total memory required for HLO temporaries (23.26G) exceeds available HBM (15.75G)'."""
  unit = {'K': 2**10, 'M': 2**20, 'G': GiB, 'T': 2**40}
  size = lambda number, letter: float(number) * unit[letter]
  used = re.search(r'Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm', message)
  if used:
    return size(used[3], used[4]), None, None, size(used[1], used[2])
  temporaries = re.search(r'temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)', message)
  if temporaries:
    temp = size(temporaries[1], temporaries[2])
    return size(temporaries[3], temporaries[4]), argument_bytes, temp, argument_bytes + temp
  return None


def format_report(report) -> str:
  gib = lambda n_bytes: 'not known (XLA refused the program)' if n_bytes is None else _size(n_bytes)
  lines = [
      f'{report["step"]} step, batch {report["batch"]}, on {report["topology"]} ({report["chips"]} x '
      f'{report["device_kind"]}), mesh {report["mesh"]}',
      'per chip:',
      f'  parameters       {gib(report["params_bytes"])}',
      f'  optimizer state  {gib(report["optimizer_bytes"])}',
      f'  batch and step   {gib(report["other_argument_bytes"])}',
      f'  temporaries      {gib(report["temp_bytes"])}',
  ]
  if report['host_temp_bytes']:
    lines.append(f'  in host memory   {gib(report["host_temp_bytes"])} (offloaded: model.remat={report["remat"]}; not in the total)')
  if report['hbm_bytes'] is None:
    lines.append(f'  total            {gib(report["total_bytes"])} (HBM unknown on this device)')
  else:
    verdict = ('fits' if report['fits'] else
               f'does not fit: {gib(report["total_bytes"] - report["hbm_bytes"])} over')
    lines.append(f'  total            {gib(report["total_bytes"])} of {gib(report["hbm_bytes"])} HBM: {verdict}')
  cost = report['step_cost_per_chip']
  xla_flops = cost['flops'] if cost else report['step_flops_per_chip']
  counted = ('XLA counts {:.3e} (every loop iteration; attention inside custom kernels added), and {:.3e} bytes of '
             'memory traffic'.format(xla_flops, cost['bytes accessed']) if cost else f'XLA counts {xla_flops:.3e}')
  lines.append(f'  FLOPs per step   {report["model_flops_per_chip"]:.3e} model FLOPs (as MFU counts them); {counted}')
  estimate = report['roofline']
  if estimate:
    lines.append('step time, a roofline estimate (not a measurement; no collectives or host transfers): '
                 f'{estimate["step_seconds"]:.3g} s '
                 f'(compute {estimate["compute_seconds"]:.3g} s at {estimate["peak_flops"] / 1e12:.0f} TFLOP/s, '
                 f'HBM {estimate["memory_seconds"]:.3g} s at {estimate["hbm_bandwidth"] / 1e9:.0f} GB/s), '
                 f'MFU at most {100 * estimate["mfu"]:.0f}%')
  if report['peak_buffers'] and report['heap_bytes'] is None:
    lines.append('largest allocations in HBM, as XLA:TPU lists them in its refusal:')
  elif report['peak_buffers']:
    lines.append(f'largest arrays live at the memory peak (XLA\'s heap of temporaries {_size(report["heap_bytes"])}, '
                 f'{_size(report["peak_live_bytes"])} live then):')
  lines += [f'  {_size(b["bytes"]):>10}  {b["shape"]:<22} {b["op"]}' + (f'  [{b["source"]}]' if b['source'] else '')
            for b in report['peak_buffers'] or []]
  lines.append(f'compiled in {report["compile_seconds"]:.1f} s ({report["compile_cpu_seconds"]:.1f} s of CPU time)')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments {argv[1:]}; every setting is a --config.key=value flag.')
  from nopejax import config
  try:
    report = plan(cli.CONFIG.value, _TOPOLOGY.value, _BUFFERS.value)
  except config.ConfigError as e:
    cli.fail(str(e))
  print(json.dumps(report) if _JSON.value else format_report(report))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
