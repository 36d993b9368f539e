import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import make_batch, sharded_train_step, small_config
from nopejax import optim, sharding, step as step_lib
from nopejax.config import ConfigError

# Logical axes of every parameter, and the mesh axes the default rules (nopejax/defaults.py) send them to.
EXPECTED_SPECS = {
    'embed_VxD': P('tensor', 'fsdp'),
    'head_DxV': P('fsdp', 'tensor'),
    'q_DxHxDh': P('fsdp', 'tensor', None),
    'k_DxKxDh': P('fsdp', 'tensor', None),
    'v_DxKxDh': P('fsdp', 'tensor', None),
    'o_HxDhxD': P('tensor', None, 'fsdp'),
    'gate_DxF': P('fsdp', 'tensor'),
    'up_DxF': P('fsdp', 'tensor'),
    'down_FxD': P('tensor', 'fsdp'),
    'scale': P(None),
    'temperature': P(None),
}


def with_mesh(cfg, data, fsdp, tensor):
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
  return cfg


def test_mesh_shape_resolves_minus_one_and_rejects_mismatches():
  cfg = small_config()
  assert sharding.mesh_shape(with_mesh(cfg, -1, 2, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(with_mesh(cfg, 1, -1, 1), 8) == (1, 8, 1)
  with pytest.raises(ConfigError, match='uses 4 devices but 8 are present'):
    sharding.mesh_shape(with_mesh(cfg, 2, 2, 1), 8)
  with pytest.raises(ConfigError, match='3 does not divide 8'):
    sharding.mesh_shape(with_mesh(cfg, -1, 3, 1), 8)
  with pytest.raises(ConfigError, match='at most one -1'):
    sharding.mesh_shape(with_mesh(cfg, -1, -1, 1), 8)


@pytest.mark.parametrize('changes, message', [
    ({'mesh.rules': (('batch', ('data', 'fsdpp')),)},
     "mesh.rules sends 'batch' to 'fsdpp', which is not a mesh axis ('data', 'fsdp', 'tensor')"),
    ({'train.batch_size': 12}, "train.batch_size=12 cannot be split over the 8 devices of mesh axes ('data', 'fsdp')"),
])
def test_what_the_devices_must_allow_is_checked_with_the_mesh(changes, message):
  cfg = small_config()
  for dotted, value in changes.items():
    section, key = dotted.split('.')
    cfg[section][key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    sharding.make_mesh(cfg)


def test_logical_spec_uses_each_mesh_axis_once():
  rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'))
  assert sharding.logical_spec(('batch', 'seq'), rules) == P(('data', 'fsdp'), None)
  assert sharding.logical_spec(('embed', 'mlp'), rules) == P('fsdp', 'tensor')
  assert sharding.logical_spec(('batch', 'embed'), rules) == P(('data', 'fsdp'), None)


def test_parameter_that_does_not_divide_the_mesh_is_named():
  cfg = with_mesh(small_config(), 1, 1, 8)  # 2 kv heads cannot split 8 ways.
  mesh = sharding.make_mesh(cfg)
  with pytest.raises(ConfigError, match=r'Parameter .*k_DxKxDh .* cannot be split 8 ways'):
    step_lib.abstract_state(cfg, mesh, optim.make_optimizer(cfg))


def one_layer_config():
  """small_config with one block: every kind of parameter (and so every sharding rule) is there, in
  half the program XLA compiles for a sharded train step."""
  cfg = small_config()
  cfg.model.num_layers = 1
  return cfg


@pytest.mark.parametrize('mesh_sizes', [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_train_step_runs_and_keeps_every_parameter_sharded(mesh_sizes):
  cfg = with_mesh(one_layer_config(), *mesh_sizes)
  mesh, state, train_step, batch_sharding = sharded_train_step(cfg)
  with jax.set_mesh(mesh):
    new_state, metrics = train_step(state, jax.device_put(make_batch(), batch_sharding))
    assert np.isfinite(float(metrics['loss']))

  assert dict(mesh.shape) == dict(zip(sharding.MESH_AXES, mesh_sizes))
  checked = set()
  for tree in (new_state['params'], new_state['frozen'], new_state['opt']):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]:
      if not isinstance(leaf, nnx.Variable):
        continue  # Optimizer counters: replicated scalars.
      name = str(path[-1].key)
      expected = EXPECTED_SPECS[name]
      array = leaf[...]
      spec = array.sharding.spec
      if tree is new_state['opt']:
        # mesh.shard_optimizer: the moments take the weights' layout, also split over `data` (ZeRO-1)
        # where a dimension is free to (sharding.split_over); on the pure data mesh, all but the
        # 4 temperatures over 8 devices are.
        kept = [tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if a != 'data') for e in spec]
        spec = P(*(axes[0] if len(axes) == 1 else axes or None for axes in kept))
        split = any('data' in ((e,) if isinstance(e, str) else e or ()) for e in array.sharding.spec)
        assert split or mesh_sizes != (8, 1, 1) or name == 'temperature', path
        param_shard_size = array.size // math.prod(mesh.shape[a] for e in expected for a in ((e,) if isinstance(e, str) else e or ()))
        assert array.addressable_shards[0].data.size * (mesh.shape['data'] if split else 1) == param_shard_size
      assert spec == expected, (path, array.sharding.spec)
      # Each device holds exactly its shard: the array is really split, not replicated.
      ways = [int(np.prod([mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ())])) for e in array.sharding.spec]
      assert array.sharding.shard_shape(array.shape) == tuple(d // w for d, w in zip(array.shape, ways + [1] * 3))
      checked.add(name)
  assert checked == set(EXPECTED_SPECS)


def test_split_over_takes_the_first_dimension_no_mesh_axis_splits_yet():
  mesh = jax.make_mesh((4, 1, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  named = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))
  shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((64, 8), (4, 6, 8), (6,), (8, 8))]
  shardings = [named('fsdp', 'tensor'), named('tensor', None, None), named(None), named('data', None)]
  split = sharding.split_over(shardings, shapes, 'data')
  # fsdp has size 1, so dimension 0 is free; 'tensor' (2) already splits (4, 6, 8)'s first; 6 does not
  # divide by 4; an array already split over data stays as it was.
  assert [s.spec for s in split] == [P(('fsdp', 'data'), 'tensor'), P('tensor', None, 'data'), P(None), P('data', None)]


def test_sharded_optimizer_state_gives_the_replicated_step():
  results = []
  for shard_optimizer in (False, True):
    cfg = with_mesh(one_layer_config(), 8, 1, 1)
    cfg.mesh.shard_optimizer = shard_optimizer
    mesh, state, step, batch_sharding = sharded_train_step(cfg)
    with jax.set_mesh(mesh):
      batch = jax.device_put(make_batch(), batch_sharding)
      for _ in range(2):
        state, _ = step(state, batch)
      results.append(jax.tree.map(np.asarray, nnx.to_pure_dict(state['params'])))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results)


def test_compiler_options_only_for_cpu_meshes_of_several_devices():
  cpu_mesh, one_device_mesh = sharding.make_mesh(small_config()), jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  assert cpu_mesh.devices.size == 8 and sharding.compiler_options(cpu_mesh) == sharding.CPU_COMPILER_OPTIONS
  assert sharding.compiler_options(one_device_mesh) is None
  x = jnp.ones((64, 32))
  compiled = {}
  for name, mesh in ('eight', cpu_mesh), ('one', one_device_mesh):
    step = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(), compiler_options=sharding.compiler_options(mesh))
    compiled[name] = step.lower(x, x.T).compile().as_text()
  assert 'ynn' not in compiled['eight'] and 'ynn' in compiled['one']  # The matmul out of YNNPACK, or in it.


def test_bytes_per_device_divides_sharded_parameters():
  cfg = with_mesh(small_config(), 1, 8, 1)
  mesh = sharding.make_mesh(cfg)
  _, abstract, shardings = step_lib.abstract_state(cfg, mesh, optim.make_optimizer(cfg))
  model_state = step_lib.model_state(abstract)
  total = sum(x.size * 4 for x in jax.tree.leaves(model_state))
  per_device = sharding.bytes_per_device(model_state, step_lib.model_state(shardings))
  vectors = sum(x.size * 4 for x in jax.tree.leaves(model_state) if x.ndim == 1)  # Norms, temperatures: replicated.
  assert per_device == (total - vectors) // 8 + vectors


# --- Processes --------------------------------------------------------------------------------


CLUSTER_VARIABLES = ('OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK',
                     'SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID',
                     'KUBERNETES_SERVICE_HOST', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES')


@pytest.fixture
def initialize_calls(monkeypatch):
  """jax.distributed.initialize replaced by a recorder; no cluster variables in the environment."""
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args, **kwargs: calls.append(args))
  return calls


def test_a_lone_process_never_starts_a_coordinator(initialize_calls, monkeypatch):
  assert sharding.detected_cluster() is None
  assert sharding.join_processes() == 1 and initialize_calls == []
  # libtpu on a machine without TPU can leave a warning with a comma in TPU_WORKER_HOSTNAMES: no TPU VM, no cluster.
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'WARNING: Could not determine TPU worker hostnames, using localhost,')
  assert sharding.join_processes() == 1 and initialize_calls == []


def test_open_mpi_and_slurm_jobs_are_detected(initialize_calls, monkeypatch):
  for name, value in {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1:34911', 'OMPI_COMM_WORLD_SIZE': '2',
                      'OMPI_COMM_WORLD_RANK': '1', 'OMPI_COMM_WORLD_LOCAL_RANK': '0'}.items():
    monkeypatch.setenv(name, value)
  assert sharding.detected_cluster().__name__ == 'OmpiCluster'
  sharding.join_processes()
  assert initialize_calls == [()]  # jax reads the rest from the same variables.
  for name in CLUSTER_VARIABLES[:4]:
    monkeypatch.delenv(name)
  for name, value in {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_NTASKS': '1',
                      'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}.items():
    monkeypatch.setenv(name, value)
  assert sharding.detected_cluster().__name__ == 'SlurmCluster'
  assert sharding.join_processes() == 1 and len(initialize_calls) == 1  # A one-task job stays alone.
  monkeypatch.setenv('SLURM_NTASKS', '2')
  sharding.join_processes()
  assert len(initialize_calls) == 2


def test_processes_joined_by_hand(initialize_calls):
  assert sharding.join_processes('host0:1234', 2, 1) == 2
  assert initialize_calls == [('host0:1234', 2, 1)]
  with pytest.raises(ConfigError, match='pass all three, with 0 <= process_id < num_processes'):
    sharding.join_processes('host0:1234', 2, None)
  with pytest.raises(ConfigError, match='pass all three'):
    sharding.join_processes('host0:1234', 2, 2)


class _TwoSlicesOfTheBatch:
  """A sharding as process 1 of 4 sees it: its devices hold rows 8-11 and 24-27 of 32."""

  def addressable_devices_indices_map(self, shape):
    return {'device a': (slice(24, 28), slice(None)), 'device b': (slice(8, 12), slice(None))}


def test_process_rows_follow_the_devices_of_this_process():
  assert sharding.process_rows(_TwoSlicesOfTheBatch(), 32) == [8, 9, 10, 11, 24, 25, 26, 27]
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batch = sharding.batch_sharding(mesh, (('batch', 'data'), ('seq', None)))
  assert sharding.process_rows(batch, 8) == list(range(8))  # One process holds every row.
