"""The processes and devices of a run, the mesh over them, and where every array lives on it:
logical axis names mapped to mesh axes by config rules."""
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nopejax.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')

# XLA:CPU options for the train steps compiled on a CPU mesh of several (simulated) devices: dots and
# reductions to Eigen instead of YNNPACK. Faster there (docs/benchmarks.md), but
# slower on one device and in the evaluation's forward passes, which keep XLA's defaults.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def detected_cluster():
  """jax's own cluster detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes), as
  jax.distributed.initialize() does it; None on a lone machine. The classes are private to jax,
  but they are what initialize() itself consults, environment variables and all."""
  from jax._src import clusters
  return next((env for env in clusters.ClusterEnv._cluster_types
               if not env.opt_in_only_method and env.is_env_present()), None)


def join_processes(coordinator_address=None, num_processes=None, process_id=None) -> int:
  """Connects this process to the others of its job (jax.distributed.initialize); returns the
  process count.

  Explicit arguments (all three) win. Otherwise jax's cluster detection decides, and a job of one
  process, like any lone machine (laptop, Colab, one TPU VM), never starts or contacts a
  coordinator. Must run before anything touches a jax device.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit) or not 0 <= process_id < num_processes:
      raise ConfigError(
          f'--coordinator_address={coordinator_address} --num_processes={num_processes} --process_id={process_id} '
          'do not describe a process of a job; pass all three, with 0 <= process_id < num_processes.')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return num_processes
  cluster = detected_cluster()
  if cluster is None or cluster.get_process_count() < 2:
    return 1
  jax.distributed.initialize()
  return jax.process_count()


def mesh_shape(cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves the configured axis sizes (-1 = the rest) against the device count."""
  sizes = [cfg.mesh[name] for name in MESH_AXES]
  described = ' '.join(f'mesh.{n}={s}' for n, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'{described} is not a mesh: give each axis a positive size, with at most one -1 for the rest.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'{described} cannot fill {num_devices} devices because {known} does not divide {num_devices}; change the mesh sizes.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f'{described} uses {math.prod(sizes)} devices but {num_devices} are present; '
        'change the mesh sizes so their product matches, or set one of them to -1.')
  return tuple(sizes)


def check_rules(rules) -> None:
  for logical, mesh_axes in rules:
    for axis in (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ()):
      if axis not in MESH_AXES:
        raise ConfigError(f'mesh.rules sends {logical!r} to {axis!r}, which is not a mesh axis {MESH_AXES}; '
                          'name one of those (or None) in that rule.')


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  """The configured mesh over `devices` (default all), after checking what the devices must allow."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  check_rules(cfg.mesh.rules)
  batch_axes = logical_spec(('batch',), cfg.mesh.rules)[0]
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  ways = math.prod(dict(zip(MESH_AXES, shape))[axis] for axis in batch_axes)
  if cfg.train.batch_size % ways:
    raise ConfigError(
        f'train.batch_size={cfg.train.batch_size} cannot be split over the {ways} devices of mesh axes {batch_axes} '
        f'that hold the batch; set train.batch_size to a multiple of {ways} or change the mesh.')
  k = cfg.train.microbatches
  if k > 1 and cfg.train.batch_size % (k * ways):
    raise ConfigError(
        f'train.batch_size={cfg.train.batch_size} in train.microbatches={k} gives microbatches that cannot be split '
        f'over the {ways} devices of mesh axes {batch_axes}; set train.batch_size to a multiple of {k * ways} or '
        'fewer microbatches.')
  # Auto axes: XLA propagates shardings between the annotated points (GSPMD style).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices)


def compiler_options(mesh):
  """jax.jit's compiler_options for a train step on `mesh`: CPU_COMPILER_OPTIONS on a CPU mesh of more
  than one device, else none (XLA's defaults)."""
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  return dict(CPU_COMPILER_OPTIONS) if on_cpu and mesh.devices.size > 1 else None


def logical_spec(axes, rules) -> P:
  """PartitionSpec for logical axis names; a name absent from the rules is replicated."""
  table = dict(rules)
  spec, used = [], set()
  for name in axes:
    mesh_axes = table.get(name)
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    # A mesh axis can shard only one dimension of an array.
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*spec)


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh, rules):
  """NamedShardings mirroring `state` (params, optimizer state): Variables by their `axes`, the rest replicated."""

  def sharding_of(path, leaf):
    if not _is_variable(leaf):
      return NamedSharding(mesh, P())
    spec = logical_spec(leaf.get_metadata().get('axes', ()), rules)
    for dim, mesh_axes in zip(leaf.shape, spec):
      ways = math.prod(mesh.shape[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()))
      if dim % ways:
        name = '.'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
        raise ConfigError(
            f'Parameter {name} of shape {tuple(leaf.shape)} cannot be split {ways} ways along {mesh_axes}; '
            'change the mesh sizes (mesh.*) or the model width so they divide.')
    return leaf.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(sharding_of, state, is_leaf=_is_variable)


def split_over(shardings, shapes, mesh_axis):
  """`shardings` with each array also split over `mesh_axis`, along its first dimension that is not split
  yet (mesh axes of size 1 do not count) and divides evenly; arrays with none stay as they were.
  ZeRO-1 for the optimizer state: under data parallelism every device would otherwise hold and
  update all of the moments; split, each updates 1/n of them and XLA gathers the new weights."""
  def split(sharding, shape):
    named = sharding.get_value() if _is_variable(sharding) else sharding
    sizes = named.mesh.shape
    ways = sizes[mesh_axis]
    spec = [(axes,) if isinstance(axes, str) else tuple(axes or ()) for axes in named.spec]
    spec += [()] * (len(shape.shape) - len(spec))
    if ways == 1 or any(mesh_axis in axes for axes in spec):
      return sharding
    for dim, (size, axes) in enumerate(zip(shape.shape, spec)):
      if math.prod(sizes[a] for a in axes) == 1 and size % ways == 0:
        spec[dim] = axes + (mesh_axis,)
        new = NamedSharding(named.mesh, P(*(axes or None for axes in spec)))
        return sharding.replace(new) if _is_variable(sharding) else new
    return sharding

  return jax.tree.map(split, shardings, shapes, is_leaf=_is_variable)


def batch_sharding(mesh, rules) -> NamedSharding:
  """Batches are [batch, time]: rows split over the batch axes, time kept whole."""
  return NamedSharding(mesh, logical_spec(('batch', 'seq'), rules))


def process_rows(sharding, batch_size: int) -> list[int]:
  """The global batch rows this process supplies (those its devices hold), in the order
  jax.make_array_from_process_local_data takes them."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size, 1)).values():
    rows.update(range(batch_size)[index[0]])
  return sorted(rows)


def constrain(x, axes, rules):
  """Pins an activation's sharding inside a jitted function run under `jax.set_mesh`; a no-op without a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(axes, rules))


def bytes_per_device(state, shardings) -> int:
  """Bytes one device holds of `state` under `shardings` (shapes only; works on abstract state)."""
  leaves = jax.tree.leaves(state)
  sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  total = 0
  for leaf, sharding in zip(leaves, sharding_leaves, strict=True):
    shard_shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
  return total
