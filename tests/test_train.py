"""The command line: exit codes and one-sentence errors (each run is a fresh process)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from nopejax import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*args):
  return subprocess.run([sys.executable, '-m', 'nopejax.train', *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ), timeout=300)


@pytest.mark.parametrize('args, message', [
    (['--config.train.stepz=5'], 'error: Unknown config key train.stepz; every key is declared in nopejax/defaults.py'),
    (['--config.mesh.data=3'], 'error: mesh.data=3 mesh.fsdp=1 mesh.tensor=1 uses 3 devices but 8 are present'),
    (['--config.model.num_heads=3'], 'error: model.num_heads=3 does not divide model.embed_dim=128; change model.num_heads'),
    (['--config.model.num_kv_heads=3'], 'error: model.num_kv_heads=3 does not divide model.num_heads=4'),
    (['--config.train.steps=many'], "error: flag --config.train.steps=many: invalid literal for int()"),
])
def test_bad_input_exits_2_with_one_sentence(tmp_path, args, message):
  result = train('--config', 'configs/tiny.py', '--workdir', str(tmp_path / 'run'), *args)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('source, message', [
    ('from nopejax import config\ndef get_config(:\n  return config.get_config()\n',
     'fails at line 2 (SyntaxError: invalid syntax); fix it so that its get_config() returns the config.'),
    ('from nopejax import config\ndef get_config():\n  return config.get_config().train.nothing\n',
     'fails (AttributeError: '),
], ids=['syntax_error', 'failing_get_config'])
def test_a_broken_config_file_is_one_sentence(tmp_path, source, message):
  (tmp_path / 'broken.py').write_text(source)
  result = train('--config', str(tmp_path / 'broken.py'), '--workdir', str(tmp_path / 'run'))
  assert result.returncode == 2 and result.stderr.startswith(f'error: The config file {tmp_path}/broken.py {message}')
  assert 'Traceback' not in result.stderr and not os.path.exists(tmp_path / 'run')


def test_missing_config_file_exits_2(tmp_path):
  result = train('--config', 'configs/nothing.py', '--workdir', str(tmp_path))
  assert result.returncode == 2 and 'error: Cannot load the config file configs/nothing.py' in result.stderr


def test_dry_run_of_the_1b_config():
  result = train('--config', 'configs/1b.py', '--dry_run')
  assert result.returncode == 0, result.stderr[-2000:]
  assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices)" in result.stdout
  assert 'parameters: 1,100,048,384 + 704 temperatures' in result.stdout
  assert 'bytes per device: params 550,349,568' in result.stdout


# --- Several processes and stop signals (real subprocesses, real signals) -----------------------


def small_run_flags(tfds_dir, workdir):
  """conftest.small_config as command-line flags."""
  values = {'model.num_layers': 2, 'model.embed_dim': 64, 'model.num_heads': 4, 'model.num_kv_heads': 2,
            'model.mlp_dim': 128, 'data.seq_len': 16, 'train.batch_size': 8, 'train.steps': 40,
            'train.warmup_steps': 5, 'train.log_every': 1, 'train.eval_every': 0, 'train.eval_batches': 2,
            'train.checkpoint_every': 10, 'train.peak_flops_per_device': 1e9, 'data.tfds_dir': tfds_dir}
  return ['--config', 'configs/base.py', '--workdir', workdir] + [f'--config.{k}={v}' for k, v in values.items()]


def start_train(args, devices, log):
  """A training process whose output goes to the file `log` (a pipe could fill up and block it)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', no_proxy='localhost,127.0.0.1', NO_PROXY='localhost,127.0.0.1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                       '--xla_cpu_collective_call_terminate_timeout_seconds=60')
  with open(log, 'w') as out:
    process = subprocess.Popen([sys.executable, '-m', 'nopejax.train', *args], cwd=ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
  process.log = log
  return process


def finished_output(process, timeout):
  process.wait(timeout=timeout)
  with open(process.log) as f:
    return f.read()


def wait_for_step(workdir, step, processes, timeout=240):
  """Waits until process 0 has logged `step` in metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(p.poll() is not None for p in processes):
      raise AssertionError('a process ended early: ' + finished_output(processes[0], 10)[-3000:])
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(line)['step'] >= step for line in f if line.endswith('\n')):
          return
    time.sleep(0.2)
  raise AssertionError(f'step {step} not reached in {timeout} s')


def metrics_of(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def stopped_step(stderr):
  match = re.search(r'Stopped at step (\d+) by (\S+)', stderr)
  assert match, stderr[-3000:]
  return int(match.group(1))


def test_sigint_finishes_the_step_saves_and_exits_0(tfds_dir, small_run, tmp_path):
  workdir = str(tmp_path / 'run')
  process = start_train(small_run_flags(tfds_dir, workdir), 8, tmp_path / 'log')
  wait_for_step(workdir, 3, [process])
  process.send_signal(signal.SIGINT)
  stderr = finished_output(process, 120)
  assert process.returncode == 0, stderr[-3000:]
  step = stopped_step(stderr)
  assert 'SIGINT received: finishing this step' in stderr and 'Traceback' not in stderr
  assert f'checkpoint saved in {workdir}/checkpoints/{step}; run the same command to resume' in stderr
  assert str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))
  assert [m['step'] for m in metrics_of(workdir)] == list(range(1, step + 1))


def test_two_processes_train_like_one_stop_together_on_sigterm_and_resume_as_one(tfds_dir, small_run, tmp_path):
  """Two processes of 4 CPU devices (localhost coordinator, gloo collectives) train as one process of
  8 devices does; SIGTERM to process 1 stops both at the same step with one checkpoint; one process
  with 8 devices resumes it and continues with the uninterrupted run's losses."""
  cfg, full_dir = small_run
  workdir = str(tmp_path / 'run')
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  processes = [start_train(small_run_flags(tfds_dir, workdir) + [
      f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'], 4, tmp_path / f'log{i}')
      for i in range(2)]
  try:
    wait_for_step(workdir, 3, processes)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [finished_output(p, 240) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-3000:]
  steps = [stopped_step(output) for output in outputs]
  assert steps[0] == steps[1] and steps[0] < 40
  stop = steps[0]
  assert "Mesh {'data': 8, 'fsdp': 1, 'tensor': 1} over 8 devices" in outputs[1]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int)[-1] == str(stop)
  # Only process 0 writes logs: each step once, one TensorBoard file.
  assert [m['step'] for m in metrics_of(workdir)] == list(range(1, stop + 1))
  assert len(os.listdir(os.path.join(workdir, 'tensorboard'))) == 1
  full = {m['step']: m['loss'] for m in metrics_of(full_dir)}
  # XLA:CPU sums in another order across processes (apis.md, Reproducibility): measured 2e-7 apart.
  np.testing.assert_allclose([m['loss'] for m in metrics_of(workdir)], [full[s] for s in range(1, stop + 1)],
                             rtol=1e-5)

  loop.run(cfg, workdir)  # One process, 8 devices: the data position of both processes' rows continues.
  resumed = {m['step']: m['loss'] for m in metrics_of(workdir)}
  assert sorted(resumed) == list(range(1, 41))
  np.testing.assert_allclose([resumed[s] for s in range(stop + 1, 41)], [full[s] for s in range(stop + 1, 41)],
                             rtol=1e-5)


def test_no_traceback_follows_the_error_sentence(tfds_dir, small_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(small_run[1], workdir)
  for step in ('20', '30', '40'):  # Every step damaged: nothing to fall back to.
    for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', step, 'model')):
      for name in files:
        if os.path.basename(root) == 'd':
          with open(os.path.join(root, name), 'wb') as f:
            f.write(b'garbage')
  result = subprocess.run([sys.executable, '-m', 'nopejax.train', *small_run_flags(tfds_dir, workdir)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
  assert result.returncode == 2
  after = result.stderr[result.stderr.index('error: '):]
  assert after.startswith('error: The checkpoint at') and after.count('\n') == 1, after[-3000:]
  # Nor before it: the failed reads' late callbacks and unretrieved tasks print nothing.
  assert 'Traceback' not in result.stderr and 'Task exception' not in result.stderr, result.stderr[-3000:]
