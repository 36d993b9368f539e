import json
import os
import re
import subprocess
import sys

import pytest

from conftest import small_config
from nopejax import hlo, plan
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
  assert 0 <= report['optimizer_bytes'] - 2 * 4 * params // 4 < 64  # And optax.apply_if_finite's counters.
  assert report['temp_bytes'] > 0 and report['step_flops_per_chip'] > 0
  assert report['fits'] and report['total_bytes'] < report['hbm_bytes'] == 16 * 2**30
  # The largest arrays at the memory peak, from XLA:TPU's buffer assignment, biggest first.
  buffers = report['peak_buffers']
  assert buffers and all(b['bytes'] > 0 and re.fullmatch(r'(pred|[bsuf]\w*\d+)\[[\d,]*\]', b['shape']) and b['op']
                         for b in buffers)
  assert [b['bytes'] for b in buffers] == sorted((b['bytes'] for b in buffers), reverse=True)
  assert 0 < report['peak_live_bytes'] <= report['heap_bytes'] <= report['temp_bytes']
  # The one scanned layer's body counts once per iteration, and the roofline is v5e's.
  assert report['step_cost_per_chip']['flops'] >= report['step_flops_per_chip']
  estimate = report['roofline']
  assert (estimate['peak_flops'], estimate['hbm_bandwidth']) == (197e12, 819e9)
  assert estimate['step_seconds'] == max(estimate['compute_seconds'], estimate['memory_seconds']) > 0
  assert 0 < estimate['mfu'] < 1


def test_offloaded_layer_inputs_leave_the_chips_memory():
  # model.remat='offload': the scan's saved layer inputs, [L, rows per chip, T, D] float32 here,
  # are host memory, reported apart from the HBM total.
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  command = [sys.executable, '-m', 'nopejax.plan', '--config', 'configs/tiny.py', '--topology', 'v5e-4',
             '--config.model.num_layers=2', '--config.train.batch_size=32', '--config.model.scan_layers=True']
  reports = {}
  for remat in ('full', 'offload'):
    result = subprocess.run(command + [f'--config.model.remat={remat}', '--json'], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    reports[remat] = json.loads(result.stdout.strip().splitlines()[-1])
  layer_inputs = 2 * (32 // 4) * 64 * 128 * 4
  assert reports['full']['host_temp_bytes'] == 0
  assert reports['offload']['host_temp_bytes'] >= layer_inputs
  text = plan.format_report(reports['offload'])
  assert 'in host memory' in text and 'model.remat=offload' in text


def test_plan_on_local_devices_names_the_peak_buffers_and_counts_every_layer():
  # Eight CPU devices: XLA:CPU writes the same buffer assignment. Scanned or not, a step's FLOPs
  # are the same once each loop body counts once per iteration.
  cfg = small_config()
  cfg.model.num_layers = 3
  reports = {}
  for scan in (True, False):
    cfg.model.scan_layers = scan
    reports[scan] = plan.plan(cfg, buffers=5)
  scanned, unrolled = reports[True], reports[False]
  assert scanned['step_flops_per_chip'] < 0.6 * unrolled['step_flops_per_chip']  # XLA's own count: one layer.
  assert abs(scanned['step_cost_per_chip']['flops'] / unrolled['step_cost_per_chip']['flops'] - 1) < 0.01
  assert scanned['roofline'] is None  # No peak FLOP/s known for a CPU.
  assert len(scanned['peak_buffers']) == 5 and scanned['peak_buffers'][0]['bytes'] > 0
  text = plan.format_report(scanned)
  assert 'largest arrays live at the memory peak' in text and scanned['peak_buffers'][0]['shape'] in text


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


def test_a_refusal_lists_xla_largest_allocations():
  message = '''RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm.
  Largest program allocations in hbm:

  1. Size: 1.00G
     Operator: op_name="jit(train_step)/transpose(jvp(jit(_take)))/scatter-add"
     Shape: f32[2097152,8]{1,0:T(8,128)}
     Unpadded size: 64.00M
     XLA label: copy.1394 = copy(bitcast.1885)
     Allocation type: HLO temp
     ==========================

  2. Size: 4.42M
     Shape: s32[1158148]{0:T(1024)}
     XLA label: deduplicated constant
     Allocation type: global
     ==========================


  Largest program arguments and outputs in hbm:

  1. Size: 1000.0K
     Shape: f32[8,32000]{1,0:T(8,128)}
'''
  first, second = hlo.refusal_buffers(message)
  assert first == hlo.Buffer(2**30, 'f32[2097152,8]', 'copy.1394', 'transpose(jvp(jit(_take)))/scatter-add', 'HLO temp')
  assert (second.bytes, second.shape, second.op, second.source) == (int(4.42 * 2**20), 's32[1158148]',
                                                                     'deduplicated constant', 'global')
  assert hlo.refusal_buffers('RESOURCE_EXHAUSTED: HLO temporaries (23.26G) exceeds available HBM (15.75G)') == []
