"""Tests of nopejax/attention/platform.py: the Pallas splash kernel (interpreted on CPU, compiled for a TPU slice)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nopejax import attention
from tests.attention.reference import assert_close, assert_kernel_matches_xla_in_outputs_and_gradients, packed_inputs

SPLASH_CASES = [  # (heads, kv heads, length, block, dtype)
    (16, 2, 150, 128, jnp.float32),  # Pallas interpret mode; 150 pads to 256; 8 query heads per kv head.
    (4, 4, 37, 512, jnp.bfloat16),
]


@pytest.mark.parametrize('heads,kv_heads,length,block,dtype', SPLASH_CASES)
def test_splash_matches_xla_in_outputs_and_gradients(heads, kv_heads, length, block, dtype):
  assert_kernel_matches_xla_in_outputs_and_gradients('splash', heads, kv_heads, length, block, dtype)


def test_splash_runs_sharded_over_the_mesh():
  """Rows over ('data', 'fsdp') and heads over 'tensor', each device running the kernel on its share."""
  q, k, v, _, segment_ids = packed_inputs(4, 2, 40, jnp.float32, batch=4)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (('batch', ('data', 'fsdp')), ('heads', 'tensor'), ('kv_heads', 'tensor'))
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda q, k, v: attention.attend(q, k, v, segment_ids, 'splash', 128, rules=rules)).lower(q, k, v)
    assert 'shard_map' in lowered.as_text() or 'sdy.manual_computation' in lowered.as_text()
    y = lowered.compile()(q, k, v)
  assert_close(y, attention.attend(q, k, v, segment_ids, 'xla'), 1e-5)


def test_splash_gradient_compiles_for_a_tpu_slice():
  """Compiled, not run: XLA for a v5e 2x2 slice (libtpu's topology description) takes the Pallas kernel."""
  from jax.experimental import topologies
  topology = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2', chip_config_name='default',
                                          chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = jax.sharding.Mesh(np.array(topology.devices).reshape(2, 2, 1), ('data', 'fsdp', 'tensor'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (('batch', ('data', 'fsdp')), ('heads', 'tensor'), ('kv_heads', 'tensor'))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  q = jax.ShapeDtypeStruct((4, 1000, 8, 64), jnp.bfloat16, sharding=rows)
  kv = jax.ShapeDtypeStruct((4, 1000, 2, 64), jnp.bfloat16, sharding=rows)
  segment_ids = jax.ShapeDtypeStruct((4, 1000), jnp.int32, sharding=rows)
  loss = lambda q, k, v, s: jnp.sum(attention.attend(q, k, v, s, 'auto', 512, rules=rules).astype(jnp.float32))
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segment_ids).compile()
  assert 'tpu_custom_call' in compiled.as_text()  # The Mosaic kernels, forward and backward.
  assert compiled.memory_analysis().temp_size_in_bytes < 1000 * 1000 * 8 * 4  # No [T, T] logits per head.
