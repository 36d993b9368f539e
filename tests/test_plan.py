import json
import os
import subprocess
import sys

import pytest

from conftest import small_config
from nopejax import plan
from nopejax.config import ConfigError


def test_slice_names_become_topologies():
  v4 = plan.parse_topology('v4-8')
  assert (v4['chips'], v4['topology_name'], v4['chip_config']) == (4, 'v4:2x2x1', 'megacore')
  assert plan.parse_topology('v4-64')['topology_name'] == 'v4:2x4x4'
  assert plan.parse_topology('v5p-128')['topology_name'] == 'v5p:4x4x4'
  v5e = plan.parse_topology('v5e-256')
  assert (v5e['chips'], v5e['topology_name'], v5e['hbm_bytes']) == (256, 'v5e:16x16', 16 * 2**30)
  assert plan.parse_topology('v5litepod-8')['topology_name'] == 'v5e:2x4'
  assert plan.parse_topology('v6e-32')['topology_name'] == 'v6e:4x8'
  for bad in ('v5e-6', 'v4-4', 'v7-8', 'tpu'):
    with pytest.raises(ConfigError, match=f'--topology={bad} is no'):
      plan.parse_topology(bad)


def test_a_batch_the_slice_cannot_split_is_one_sentence_before_compiling():
  cfg = small_config()
  cfg.train.batch_size = 6
  with pytest.raises(ConfigError, match='train.batch_size=6 cannot be split over the 4 devices'):
    plan.plan(cfg, 'v5e-4')


def test_plan_compiles_a_small_model_for_a_tpu_slice_from_this_machine():
  # The command line, overrides and --json as a user runs them; libtpu compiles, no TPU needed.
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  result = subprocess.run(
      [sys.executable, '-m', 'nopejax.plan', '--config', 'configs/tiny.py', '--topology', 'v5e-4', '--json',
       '--config.model.num_layers=1', '--config.train.batch_size=32', '--config.model.scan_layers=True'],
      capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['device_kind'] == 'TPU v5 lite' and report['chips'] == 4 and report['step'] == 'pretrain'
  assert report['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  # Four-way data parallel: every chip holds all parameters (float32) and a quarter of AdamW's two
  # moments (mesh.shard_optimizer: every array here has a dimension that 4 divides).
  params = 256 * 128 * 2 + 4 * 128 * 128 + 3 * 128 * 384 + 3 * 128 + 4
  assert report['params_bytes'] == 4 * params
  assert report['optimizer_bytes'] == 2 * 4 * params // 4
  assert report['temp_bytes'] > 0 and report['step_flops_per_chip'] > 0
  assert report['fits'] and report['total_bytes'] < report['hbm_bytes'] == 16 * 2**30


def test_bad_topology_exits_2_with_one_sentence():
  result = subprocess.run([sys.executable, '-m', 'nopejax.plan', '--config', 'configs/tiny.py', '--topology', 'v5e-3'],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: --topology=v5e-3 is no v5e slice')


def test_xla_refusals_are_read_as_does_not_fit():
  G = 2**30
  assert plan._refused('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 50.70G of 15.75G hbm.', 1) == \
      (15.75 * G, None, None, 50.70 * G)
  assert plan._refused('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries '
                       '(23.26G) exceeds available HBM (15.75G).', G) == (15.75 * G, G, 23.26 * G, 24.26 * G)
  assert plan._refused('INTERNAL: something else', 1) is None
